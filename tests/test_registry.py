"""Models by name: the one registry style (harness/registry.py) both tasks use."""
from __future__ import annotations

import pytest

from cnn import models as cnn_models
from gwi import models as gwi_models
from harness.registry import Registry


def test_registry_builds_by_name_and_refuses_unknown_and_twice_registered_names():
    models = Registry("model")

    @models.register
    def small(width=1):
        return ("small", width)

    @models.register("big")
    class Big:
        def __init__(self, width=2):
            self.width = width

    assert models.names() == ["big", "small"] and "big" in models and "Big" not in models
    assert models.create("small", width=3) == ("small", 3) and models.create("big").width == 2
    with pytest.raises(ValueError, match=r"^unknown model 'huge'; known models: big, small$"):
        models.create("huge")
    with pytest.raises(ValueError, match="'small' is registered twice"):
        models.register("small")(lambda: None)


def test_both_tasks_register_their_models_in_that_registry():
    assert isinstance(cnn_models.MODELS, Registry) and isinstance(gwi_models.MODELS, Registry)
    assert cnn_models.known_models() == ["airbench", "mnist_tiny", "resnet9", "simplenet", "smoke_cnn"]
    assert gwi_models.known_models() == ["caformer_unet", "convnext_unet", "hgnet_unet", "inversionnet", "unet", "vit_per_source",
                                         "vit_tiled"]
    assert set(gwi_models.ENCODER_MODELS) == {"caformer_unet", "convnext_unet", "hgnet_unet", "unet", "vit_per_source", "vit_tiled"}
    assert all(gwi_models.MODELS.get(name).model_name == name for name in gwi_models.known_models())
