"""Each adapter in dist_vae/compat/ finds the private names it uses on the installed libraries, and
names the installed and supported versions in one line when one is missing (checked here against a
stand-in lacking a name, which is the checker's own input: nothing of the library is replaced)."""

from __future__ import annotations

from types import SimpleNamespace

import accelerate
import deepspeed
import pytest
import torch

from dist_vae.compat import accelerate as accelerate_compat
from dist_vae.compat import deepspeed as deepspeed_compat
from dist_vae.compat import torch_ops
from dist_vae.errors import BackendError


def test_deepspeed_adapter_finds_its_names_on_the_installed_version() -> None:
    assert deepspeed.__version__.startswith(deepspeed_compat.SUPPORTED + ".")
    deepspeed_compat.check_supported()


def test_deepspeed_adapter_names_a_missing_field_and_the_versions() -> None:
    fields = dict.fromkeys(deepspeed_compat.ZERO_FIELDS)
    engine = SimpleNamespace(**dict.fromkeys(deepspeed_compat.ENGINE_COUNTERS, 0))
    deepspeed_compat.check_supported(SimpleNamespace(**fields), engine)
    del fields["averaged_gradients"]
    with pytest.raises(BackendError) as error:
        deepspeed_compat.check_supported(SimpleNamespace(**fields), engine)
    message = str(error.value)
    assert f"deepspeed {deepspeed.__version__} lacks DeepSpeedZeroOptimizer.averaged_gradients" in message
    assert f"supported: deepspeed {deepspeed_compat.SUPPORTED}.x" in message


def test_accelerate_adapter_finds_its_names_on_the_installed_version() -> None:
    assert accelerate.__version__.split(".")[0] == accelerate_compat.SUPPORTED
    accelerate_compat.check_supported()
    wrapped = SimpleNamespace(deepspeed_engine_wrapped=SimpleNamespace(engine="the engine"))
    assert accelerate_compat.deepspeed_engine(wrapped) == "the engine"


def test_accelerate_adapter_names_a_missing_field_and_the_versions() -> None:
    with pytest.raises(BackendError) as error:
        accelerate_compat.check_supported(SimpleNamespace())
    message = str(error.value)
    assert f"accelerate {accelerate.__version__} lacks Accelerator.deepspeed_engine_wrapped" in message
    assert f"supported: accelerate {accelerate_compat.SUPPORTED}.x" in message
    with pytest.raises(BackendError, match=r"lacks DeepSpeedEngineWrapper\.engine"):
        accelerate_compat.deepspeed_engine(SimpleNamespace(deepspeed_engine_wrapped=object()))


def test_torch_adapter_finds_its_names_on_the_installed_version() -> None:
    assert torch.__version__.startswith(torch_ops.SUPPORTED + ".")
    torch_ops.check_supported()
    shadow, current = [torch.zeros(3)], [torch.full((3,), 4.0)]
    torch_ops.lerp_all_(shadow, current, 0.25)
    assert torch.equal(shadow[0], torch.ones(3))


def test_torch_adapter_names_a_missing_name_and_the_versions() -> None:
    missing = (("torch", "_foreach_lerp_"), ("torch.utils._pytree", "no_such_function"), ("torch._nope", "x"))
    with pytest.raises(BackendError) as error:
        torch_ops.check_supported(missing)
    message = str(error.value)
    assert f"torch {torch.__version__} lacks torch.utils._pytree.no_such_function, torch._nope.x" in message
    assert f"supported: torch {torch_ops.SUPPORTED}" in message
