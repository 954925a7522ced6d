"""create_image_classifier: timm architectures as transformers models, offline."""

from __future__ import annotations

import json
import socket

import huggingface_hub.constants
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import (
    AutoModelForImageClassification,
    TimmWrapperForImageClassification,
)

from hf_gaf.train.models import create_image_classifier

RESNETS = ["resnet18", "resnet34", "resnetv2_34"]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Hub offline with an empty cache, and any socket connection an error: nothing reaches the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _batch(batch_size=2, image_size=32, num_labels=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, num_labels, (batch_size,), generator=generator)
    return pixel_values, labels


@pytest.mark.parametrize("name", RESNETS)
def test_resnets_train_with_a_cross_entropy_loss(name):
    model = create_image_classifier(name, 7, image_size=32, id2label=[f"class {i}" for i in range(7)])
    assert isinstance(model, TimmWrapperForImageClassification)
    assert model.config.num_labels == 7 and model.config.id2label[6] == "class 6"
    assert model.config.image_size == 32 and model.config.num_channels == 3

    pixel_values, labels = _batch()
    out = model(pixel_values=pixel_values, labels=labels)
    assert out.logits.shape == (2, 7)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet18", "resnetv2_34"])
def test_weights_start_from_timm_initialisation(name):
    torch.manual_seed(0)
    model = create_image_classifier(name, 7, image_size=32)
    torch.manual_seed(0)
    reference = timm.create_model(name, num_classes=7).state_dict()
    for key, value in model.timm_model.state_dict().items():
        assert torch.equal(value, reference[key]), key


@pytest.mark.parametrize("name", RESNETS)
def test_save_and_load_round_trip_offline(name, tmp_path):
    model = create_image_classifier(name, 5, image_size=32, id2label=list("abcde")).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()

    assert type(loaded) is TimmWrapperForImageClassification
    assert loaded.config.id2label == model.config.id2label and loaded.config.label2id == model.config.label2id
    assert loaded.config.problem_type == "single_label_classification"
    pixel_values, _ = _batch(batch_size=3, num_labels=5)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixel_values).logits, model(pixel_values=pixel_values).logits)


def test_fixed_size_architectures_are_built_for_image_size(tmp_path):
    model = create_image_classifier("vit_tiny_patch16_224", 3, image_size=(32, 48), drop_path_rate=0.1).eval()
    assert model.timm_model.patch_embed.grid_size == (2, 3)
    assert json.loads(model.config.to_json_string())["model_args"] == {
        "in_chans": 3, "drop_path_rate": 0.1, "img_size": [32, 48]
    }
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    pixel_values = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixel_values).logits, model(pixel_values=pixel_values).logits)


def test_in_chans_changes_the_stem():
    model = create_image_classifier("resnet18", 10, image_size=8, in_chans=1)
    assert model.timm_model.conv1.in_channels == 1
    assert model(pixel_values=torch.randn(2, 1, 8, 8)).logits.shape == (2, 10)


def test_unknown_architecture_names_the_way_to_list_them():
    with pytest.raises(ValueError, match=r"Unknown timm architecture 'resnet181'.*resnet18.*timm\.list_models"):
        create_image_classifier("resnet181", 10, image_size=32)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_labels": 1}, "num_labels.*at least two classes"),
        ({"num_labels": True}, "num_labels"),
        ({"image_size": 0}, "image_size"),
        ({"image_size": (32,)}, "image_size"),
        ({"image_size": "32"}, "image_size"),
        ({"in_chans": 0}, "in_chans"),
        ({"id2label": ["a", "b"]}, "id2label.*num_labels=10"),
        ({"id2label": {0: "a", 1: "b"}, "label2id": {"a": 1, "b": 0}, "num_labels": 2}, "inverse"),
        ({"num_classes": 10}, "use the `num_labels` argument"),
        ({"img_size": 64}, "use the `image_size` argument"),
        ({"act_layer": torch.nn.ReLU}, "JSON-serialisable"),
        ({"name": "vit_tiny_patch16_224", "image_size": 40}, r"not a multiple of the patch size.*image_size=\(32, 32\)"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, match):
    options = {"name": "resnet18", "num_labels": 10, "image_size": 32} | kwargs
    with pytest.raises(ValueError, match=match):
        create_image_classifier(options.pop("name"), options.pop("num_labels"), **options)


def test_pretrained_offline_fails_fast_and_says_how_to_proceed():
    with pytest.raises(OSError, match=r"(?s)pretrained=False.*HF_HUB_OFFLINE.*pretrained='/path/to/model\.safetensors'"):
        create_image_classifier("resnet18", 10, image_size=32, pretrained=True)


def test_pretrained_from_a_local_weights_file(tmp_path):
    source = timm.create_model("resnet18")  # ImageNet head: 1000 classes
    path = tmp_path / "resnet18.safetensors"
    save_file(source.state_dict(), str(path))

    model = create_image_classifier("resnet18", 10, image_size=32, pretrained=path)
    assert torch.equal(model.timm_model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.timm_model.layer4[1].bn2.weight, source.layer4[1].bn2.weight)
    assert model.timm_model.fc.out_features == 10

    with pytest.raises(FileNotFoundError, match="not a file"):
        create_image_classifier("resnet18", 10, image_size=32, pretrained=tmp_path / "missing.safetensors")


@pytest.fixture(scope="module")
def vit_large():
    """ViT-L/16 at 32 x 32 pixels (a 2 x 2 patch grid): the full-size network, cheap inputs."""
    torch.manual_seed(0)
    return create_image_classifier("vit_large_patch16_224", 10, image_size=32)


def test_vit_large_has_about_304m_parameters_and_trains_on_cpu(vit_large):
    assert 303e6 <= vit_large.num_parameters() <= 305e6
    assert vit_large.timm_model.patch_embed.grid_size == (2, 2)
    pixel_values, labels = _batch(num_labels=10)
    out = vit_large(pixel_values=pixel_values, labels=labels)
    assert out.logits.shape == (2, 10) and torch.isfinite(out.loss)
    out.loss.backward()
    assert vit_large.timm_model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert vit_large.timm_model.head.weight.grad.abs().sum() > 0
    vit_large.zero_grad(set_to_none=True)


class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, size: int, image_size: int, num_labels: int):
        self.pixel_values, self.labels = _batch(size, image_size, num_labels, seed=1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i]}


def test_vit_large_one_gaf_step_with_two_microgradients(vit_large, tmp_path):
    trainer_module = pytest.importorskip("hf_gaf.trainer", reason="GAFTrainer is not available")
    from hf_gaf import GAFTrainingArguments

    args = GAFTrainingArguments(
        output_dir=str(tmp_path),
        gaf_threshold=0.97,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
        max_steps=1,
        learning_rate=0.01,
        optim="sgd",
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = trainer_module.GAFTrainer(model=vit_large, args=args, train_dataset=_ImageDataset(4, 32, 10))
    before = {name: p.detach().clone() for name, p in vit_large.named_parameters() if name.endswith(("head.weight", "proj.weight"))}

    trainer.train()

    result = trainer.gaf_last_result
    assert trainer.state.global_step == 1 and result.num_microgradients == 2
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)
    changed = {name: not torch.equal(p, before[name]) for name, p in vit_large.named_parameters() if name in before}
    assert all(changed.values()) if not result.skipped else not any(changed.values())
