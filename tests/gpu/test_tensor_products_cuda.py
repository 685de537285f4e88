"""model.tensor_product=cueq and =oeq on a GPU: cuequivariance's CUDA kernel (uniform_1d) and
OpenEquivariance's generated kernels against the written-out contraction, through forces and
the force-loss backward (their double backward). Each skips without its package."""

import importlib.util

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from test_compiled import batch_of, outputs_and_gradients  # noqa: E402
from test_physics import alloy, make_model, mol  # noqa: E402

from megagnn import keys as K  # noqa: E402

KERNELS = {"cueq": "cuequivariance_ops_torch", "oeq": "openequivariance"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("choice", sorted(KERNELS))
def test_kernels_match_e3nn_on_forces_and_force_loss_gradients(choice, dtype):
    if importlib.util.find_spec(KERNELS[choice]) is None:
        pytest.skip(f"needs {KERNELS[choice]}")
    sizes = dict(hidden=32, num_rbf=8, radial_hidden=16)
    reference = make_model("irrep-c2", tensor_product="e3nn", **sizes).train()
    model = make_model("irrep-c2", tensor_product=choice, **sizes).train()
    model.load_state_dict(reference.state_dict())
    reference, model = reference.to("cuda", dtype), model.to("cuda", dtype)
    batch = {
        k: v.to("cuda", dtype) if v.is_floating_point() else v.to("cuda")
        for k, v in batch_of([alloy(0), alloy(1), mol()]).items()
    }
    ref, ref_grads = outputs_and_gradients(reference, reference, batch)
    out, grads = outputs_and_gradients(model, model, batch)
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    for key in (K.ENERGY, K.FORCES, K.STRESS):
        torch.testing.assert_close(out[key], ref[key], **tol)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, **tol)
