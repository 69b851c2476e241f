"""Hugging Face `Trainer` on a model patched by prefix-kernels.

A plain `Trainer` already saves the adapters, not the frozen model (the patched instance's
save_pretrained, integrations/saving.py). `PrefixTrainer` adds the two things a plain Trainer
cannot do for a patched model:
  - resume_from_checkpoint: Trainer only knows how to reload full weights or a PeftModel's
    adapters; this loads the saved prefixes back into the bank (in place, so the optimizer state
    Trainer restores still points at the bank's parameters);
  - per-row prefixes: a `prefix_ids` column of the dataset reaches the model (Trainer drops
    columns the model's forward signature does not name, and `prefix_ids` is taken by a hook).

    bank = pk.patch_model(model, 32, names=["support", "legal"])
    trainer = PrefixTrainer(model=model, args=TrainingArguments(...), train_dataset=rows)
    trainer.train(resume_from_checkpoint=True)
    trainer.save_model("out")          # out/support/, out/legal/: PEFT prefix-tuning adapters
"""
from __future__ import annotations

from transformers import Trainer

from .saving import load_adapters
from .transformers import is_patched

__all__ = ["PrefixTrainer"]


class PrefixTrainer(Trainer):
    """`transformers.Trainer` that resumes a patched model from its saved prefix adapters and
    passes the dataset's `prefix_ids` column to the model. Takes Trainer's arguments unchanged."""

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "prefix_ids" not in self._signature_columns:
            self._signature_columns.append("prefix_ids")

    def _patched(self, model=None):
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        return unwrapped if is_patched(unwrapped) else None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        patched = self._patched(model)
        if patched is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapters(patched, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        patched = self._patched()
        if patched is None:
            return super()._load_best_model()
        load_adapters(patched, self.state.best_model_checkpoint)
