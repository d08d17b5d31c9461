"""Property: on random architectures and settings (a quarter captured through torch.export),
pruning either verifies (and its ONNX export matches torch) or refuses with a
StructPruneError. Never a crash, never a mismatch, never a rule that raises.

``STRUCTPRUNE_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz.py`` runs a long search.
"""

import os
from collections import Counter

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import structprune as sp
from structprune.core.analyse import RULE_FAILED
from structprune.core.verify import flatten_outputs
from structprune.deploy.export import export_onnx, onnx_parity

from .fuzz_models import build, net_spec
from .oracles import outputs, randomize, weight_masked

EXAMPLES = int(os.environ.get("STRUCTPRUNE_FUZZ_EXAMPLES", "300"))


# a refusal is an allowed outcome for an example, but a fuzzer whose examples are mostly
# refused tests nothing: at most this share may be refused
MAX_REFUSED = 0.1


def test_random_architectures():
    outcomes: Counter[str] = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(spec=net_spec, ratio=st.floats(0.0, 0.95), round_to=st.sampled_from([1, 2, 4, 8]),
           exact_only=st.booleans(), global_ranking=st.booleans(),
           method=st.sampled_from(["auto", "auto", "auto", "export"]), data=st.data())
    def example(spec, ratio, round_to, exact_only, global_ranking, method, data):
        outcomes[check_example(spec, ratio, round_to, exact_only, global_ranking, data,
                               method)] += 1

    example()
    total = sum(outcomes.values())
    assert total >= EXAMPLES and outcomes["refused"] <= MAX_REFUSED * total, outcomes


def check_example(spec, ratio, round_to, exact_only, global_ranking, data,
                  method="auto") -> str:
    """Prune one random model; returns "verified" or "refused" (a clear StructPruneError)."""
    torch.manual_seed(0)
    model, inputs = build(spec)
    randomize(model)
    names = sorted({n.rsplit(".", 1)[0] for n, _ in model.named_parameters()})
    ignore = data.draw(st.lists(st.sampled_from(names), max_size=2, unique=True))
    try:
        result = sp.prune(model, inputs, ratio, round_to=round_to, exact_only=exact_only,
                          global_ranking=global_ranking, ignore=ignore, capture_method=method)
    except sp.StructPruneError:
        return "refused"
    assert result.verification.ok
    # a rule that raises on a call is a defect of the rule, even though the pass survives it
    assert not [r for g in result.analysis.groups for r in g.reasons if RULE_FAILED in r]
    dense_out = flatten_outputs(outputs(model, inputs))
    pruned_out = flatten_outputs(outputs(result.model, inputs))
    assert [t.shape for t in dense_out] == [t.shape for t in pruned_out]
    if result.verification.exact_units_only:
        oracle = flatten_outputs(outputs(weight_masked(model, result.plan), inputs))
        for o, p in zip(oracle, pruned_out, strict=True):
            assert torch.allclose(o, p, rtol=1e-4, atol=1e-4 * float(o.abs().max() + 1e-6))
    if data.draw(st.integers(0, 3)) == 0:  # ONNX on a quarter of the examples, for time
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fuzz_{os.getpid()}.onnx")
        export_onnx(result.model, inputs, path, exporter="torchscript")
        assert onnx_parity(path, result.model, inputs) < 1e-4
    return "verified"
