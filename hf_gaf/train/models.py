"""timm architectures as transformers models, trained from scratch by default.

`create_image_classifier` returns a stock `TimmWrapperForImageClassification`: it takes
`pixel_values` and `labels`, returns a cross-entropy loss, trains under `transformers.Trainer`
(and `GAFTrainer`), and round-trips through `save_pretrained` / `AutoModelForImageClassification.
from_pretrained` without the Hub, because everything needed to rebuild the network (timm name,
`model_args`, labels) lives in `config.json`.

timm builds the network, so the weights start from timm's own initialisation (or its pretrained
weights), not from the generic `normal(0, 0.02)` that `PreTrainedModel` would apply to every
convolution: that default makes deep ResNets trained from scratch start badly, and the paper's
runs start from timm's init.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

__all__ = ["create_image_classifier"]

# Keyword arguments that create_image_classifier sets itself; passing them through **timm_kwargs
# would silently disagree with the named parameters.
_RESERVED_TIMM_KWARGS = {
    "num_classes": "num_labels",
    "pretrained": "pretrained",
    "img_size": "image_size",
    "in_chans": "in_chans",
    "pretrained_cfg_overlay": "pretrained (a path to local weights)",
}


def create_image_classifier(
    name: str,
    num_labels: int,
    *,
    image_size: int | tuple[int, int],
    in_chans: int = 3,
    pretrained: bool | str | os.PathLike = False,
    id2label: Mapping[int, str] | Sequence[str] | None = None,
    label2id: Mapping[str, int] | None = None,
    **timm_kwargs: Any,
) -> TimmWrapperForImageClassification:
    """Build a timm architecture as a transformers image classifier.

    Args:
        name: a timm model name (`timm.list_models()`), e.g. `"resnet18"`, `"resnet34"`,
            `"resnetv2_34"` (PreAct ResNet-34) or `"vit_large_patch16_224"`. A pretrained tag
            (`"vit_large_patch16_224.augreg_in21k_ft_in1k"`) selects which weights
            `pretrained=True` loads.
        num_labels: number of classes (at least 2); the classifier head has this many outputs.
        image_size: input height and width (an int for square images). Architectures that
            need a fixed input size (ViT, Swin, ...) are built for it, e.g. `image_size=32` gives
            `vit_large_patch16_224` a 2 x 2 patch grid; size-agnostic ones (ResNets) are not
            changed, and the size is only validated and recorded in `config.image_size`.
        in_chans: number of input channels.
        pretrained: `False` (default) trains from scratch with timm's initialisation. `True`
            loads timm's pretrained weights for `name` from the Hub (or the local Hub cache);
            a path loads a local timm weights file (`.safetensors`, `.pth`, `.bin`). Either way
            timm adapts them: the classifier is re-initialised for `num_labels`, position
            embeddings are resampled to `image_size`, the stem is adapted to `in_chans`.
        id2label: class names, as a mapping `{id: name}` or a sequence indexed by id (e.g. a
            `datasets.ClassLabel`'s `.names`). Defaults to `LABEL_0`, `LABEL_1`, ...
        label2id: the inverse mapping; derived from `id2label` when omitted.
        **timm_kwargs: architecture arguments for `timm.create_model` (e.g. `drop_path_rate=0.1`).
            They are saved in `config.model_args` so `from_pretrained` rebuilds the same network,
            hence they must be JSON-serialisable (pass layers by name, e.g. `act_layer="gelu"`).

    Returns:
        A `TimmWrapperForImageClassification` whose `config.problem_type` is
        `"single_label_classification"`: `labels` are class ids and the loss is always
        cross-entropy (never the regression or multi-label loss transformers may infer).

    Raises:
        ValueError: unknown architecture (with close matches), bad `num_labels`, `image_size`,
            `in_chans`, labels or `timm_kwargs`, or an image size the patch size does not divide.
        FileNotFoundError: `pretrained` is a path that does not exist.
        OSError: pretrained weights could not be fetched (offline, no cache); the message says how
            to proceed. Set `HF_HUB_OFFLINE=1` to fail at once instead of retrying the network.
    """
    _check_architecture(name)
    _check_positive_int(num_labels, "num_labels", minimum=2, why="a classifier needs at least two classes")
    _check_positive_int(in_chans, "in_chans", minimum=1, why="images have at least one channel")
    height, width = _image_size_pair(image_size)
    id2label, label2id = _label_maps(num_labels, id2label, label2id)
    _check_timm_kwargs(timm_kwargs)

    recorded_size: int | list[int] = height if height == width else [height, width]
    model_args: dict[str, Any] = {"in_chans": in_chans, **timm_kwargs}
    if _needs_fixed_input_size(name):
        model_args["img_size"] = recorded_size

    config = TimmWrapperConfig(
        architecture=name,
        num_labels=num_labels,
        id2label=id2label,
        label2id=label2id,
        model_args=model_args,
        problem_type="single_label_classification",
        image_size=recorded_size,
        num_channels=in_chans,
    )
    # Built on the meta device, the wrapper costs nothing, skips transformers' generic
    # re-initialisation, and lets bad arguments fail before a large model is allocated. Its timm
    # model is then replaced by a real one, initialised (or loaded) by timm.
    with torch.device("meta"):
        model = TimmWrapperForImageClassification(config)
    _check_patch_grid(model.timm_model, name, (height, width))
    model.timm_model = _create_timm_model(name, num_labels, model_args, pretrained)
    return model


def _check_architecture(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a timm model name such as 'resnet18', got {name!r}.")
    if timm.is_model(name):
        return
    architecture = name.split(".", 1)[0]
    close = difflib.get_close_matches(architecture, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean one of {close}?" if close else ""
    raise ValueError(
        f"Unknown timm architecture {name!r} (timm {timm.__version__}).{hint} List the available "
        "names with `timm.list_models()` or filter them, e.g. `timm.list_models('resnet*')`; "
        "`timm.list_models(pretrained=True)` lists the names that have pretrained weights."
    )


def _check_positive_int(value: Any, argument: str, *, minimum: int, why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{argument}` must be an integer >= {minimum} ({why}), got {value!r}.")


def _image_size_pair(image_size: Any) -> tuple[int, int]:
    pair = (image_size, image_size) if not isinstance(image_size, (tuple, list)) else tuple(image_size)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(
            "`image_size` must be a positive int (square images) or a (height, width) pair of "
            f"positive ints, e.g. image_size=32 for CIFAR or 224 for ImageNet; got {image_size!r}."
        )
    return pair


def _label_maps(
    num_labels: int,
    id2label: Mapping[int, str] | Sequence[str] | None,
    label2id: Mapping[str, int] | None,
) -> tuple[dict[int, str], dict[str, int]]:
    if id2label is None:
        if label2id is not None:
            id2label = {int(i): str(label) for label, i in label2id.items()}
        else:
            id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
    elif isinstance(id2label, Mapping):
        id2label = {int(i): str(label) for i, label in id2label.items()}
    elif isinstance(id2label, Sequence) and not isinstance(id2label, str):
        id2label = dict(enumerate(map(str, id2label)))
    else:
        raise ValueError(f"`id2label` must be a mapping {{id: name}} or a sequence of names, got {type(id2label).__name__}.")
    if sorted(id2label) != list(range(num_labels)):
        raise ValueError(
            f"`id2label` must name exactly the classes 0..{num_labels - 1} (num_labels={num_labels}), "
            f"got {len(id2label)} ids; pass one name per class or drop `id2label`."
        )
    if label2id is None:
        label2id = {label: i for i, label in id2label.items()}
    else:
        label2id = {str(label): int(i) for label, i in label2id.items()}
        if {i: label for label, i in label2id.items()} != id2label:
            raise ValueError("`label2id` must be the inverse of `id2label`; pass only one of them to derive the other.")
    return id2label, label2id


def _check_timm_kwargs(timm_kwargs: dict[str, Any]) -> None:
    for key, parameter in _RESERVED_TIMM_KWARGS.items():
        if key in timm_kwargs:
            raise ValueError(f"Do not pass `{key}` through timm_kwargs; use the `{parameter}` argument of create_image_classifier.")
    try:
        json.dumps(timm_kwargs)
    except TypeError as err:
        raise ValueError(
            "timm_kwargs are saved in config.json (`model_args`) so from_pretrained can rebuild the "
            f"network, so they must be JSON-serialisable: {err}. Pass layers by name (e.g. act_layer='gelu')."
        ) from err


def _needs_fixed_input_size(name: str) -> bool:
    pretrained_cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    return bool(pretrained_cfg is not None and pretrained_cfg.fixed_input_size)


def _create_timm_model(
    name: str, num_labels: int, model_args: dict[str, Any], pretrained: bool | str | os.PathLike
) -> torch.nn.Module:
    if pretrained is None or pretrained is False:
        return timm.create_model(name, pretrained=False, num_classes=num_labels, **model_args)
    overlay: dict[str, Any] = {}
    if pretrained is not True:
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(
                f"pretrained={str(pretrained)!r} is not a file. Pass a local timm weights file "
                "(.safetensors, .pth or .bin), pretrained=True for timm's Hub weights, or pretrained=False."
            )
        overlay["pretrained_cfg_overlay"] = {"file": str(path)}
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_labels, **model_args, **overlay)
    except OSError as err:
        raise OSError(
            f"Could not load pretrained weights for {name!r}: {err}\n"
            "This usually means there is no network and the weights are not in the local Hugging Face "
            "cache. To proceed: train from scratch with pretrained=False (the default); or download the "
            "weights once where there is network (they land in the HF cache, then HF_HUB_OFFLINE=1 "
            "uses them); or pass a local weights file, pretrained='/path/to/model.safetensors'. "
            "Setting HF_HUB_OFFLINE=1 makes this fail immediately instead of retrying the network."
        ) from err


def _check_patch_grid(timm_model: torch.nn.Module, name: str, size: tuple[int, int]) -> None:
    patch_embed = getattr(timm_model, "patch_embed", None)
    patch_size = getattr(patch_embed, "patch_size", None)
    if patch_size is None:
        return
    patch_size = tuple(patch_size) if isinstance(patch_size, (tuple, list)) else (patch_size, patch_size)
    if any(s % p for s, p in zip(size, patch_size)):
        raise ValueError(
            f"image_size={size} is not a multiple of the patch size {patch_size} of {name!r}: the patch "
            "embedding would silently drop the border pixels. Resize the images to a multiple "
            f"of the patch size, e.g. image_size={tuple(max(p, s - s % p) for s, p in zip(size, patch_size))}."
        )
