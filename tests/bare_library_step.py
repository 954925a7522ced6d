"""Train GAFTrainer steps with nothing but what `pip install hf-gaf` installs (no extras).

    python tests/bare_library_step.py

Run by CI in a fresh environment holding only the bare library, and by tests/test_install.py in one
holding only the library's dependency closure. It fails, naming the module, when one of the kit's
packages can be imported (the environment is not bare), and otherwise trains a tiny classifier for
a few GAF steps on two micro-gradients and checks that they changed the model.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile

# The paper's kit and the benchmarks need these; the library must not (pyproject.toml: the `train` extra).
KIT_MODULES = ("datasets", "timm", "torchvision", "evaluate", "PIL", "sklearn", "matplotlib", "tensorboard", "trl")


def main() -> int:
    present = [name for name in KIT_MODULES if importlib.util.find_spec(name) is not None]
    if present:
        print(f"not a bare environment: {', '.join(present)} can be imported", file=sys.stderr)
        return 1

    import torch
    from torch import nn

    from hf_gaf import GAFTrainer, GAFTrainingArguments

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 3)

        def forward(self, x, labels=None):
            logits = self.layer(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"x": torch.randn(4, generator=g), "labels": torch.tensor(i % 3)}

    torch.manual_seed(0)
    model = Classifier()
    before = model.layer.weight.detach().clone()
    with tempfile.TemporaryDirectory() as output_dir:
        args = GAFTrainingArguments(
            output_dir=output_dir, use_cpu=True, report_to="none", save_strategy="no", max_steps=3,
            per_device_train_batch_size=4, gradient_accumulation_steps=2, gaf_threshold=2.0, disable_tqdm=True,
        )  # fmt: skip
        trainer = GAFTrainer(model=model, args=args, train_dataset=Data())
        metrics = trainer.train().metrics
    moved = float((model.layer.weight.detach() - before).abs().max())
    if metrics["gaf/steps"] != 3 or metrics["gaf/skipped_steps_total"] != 0 or not moved > 0:
        print(f"GAFTrainer did not train: {metrics}, largest weight change {moved}", file=sys.stderr)
        return 1
    print(f"bare library: 3 GAF steps trained, accepted fraction {metrics['gaf/accepted_fraction']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
