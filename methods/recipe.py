"""How a network is trained: optimiser, schedule, epochs, batch size, seed, augmentation."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kdarena.zoo.augment import AugmentPolicy, Policy
from kdarena.zoo.data import Dataset


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(20, gt=0)
    batch_size: int = Field(64, gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up, in epochs (fractions allowed)")
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75], description="step schedule: fractions of the epochs where lr is multiplied by gamma")
    gamma: float = Field(0.1, gt=0, le=1)
    seed: int = Field(0, ge=0)
    num_threads: int | None = Field(None, gt=0, le=1024, description="CPU threads; default: OMP_NUM_THREADS, else all cores")
    augment: AugmentPolicy | None = Field(
        None, description="augmentation policy: none | crop_flip | translate | strong, or a mapping with its options; "
                          "default: the dataset's own")
    chance_patience: int | None = Field(
        None, gt=0, description="end the run as diverged after this many epochs in a row with val_acc at chance "
                                "(the majority class's share + 1 point); none: never")

    def augment_for(self, data: Dataset) -> Policy:
        """The policy this recipe trains with on `data`: its own, else the dataset's default."""
        return self.augment or data.augment

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be less than epochs ({self.epochs})")
        if any(not 0 < m < 1 for m in self.milestones):
            raise ValueError(f"milestones are fractions of the epochs in (0, 1), got {self.milestones}")
        if self.nesterov and self.momentum == 0 and self.optimizer == "sgd":
            raise ValueError("nesterov needs momentum > 0; set nesterov: false or a momentum")
        return self
