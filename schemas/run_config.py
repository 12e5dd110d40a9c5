"""The ``synpref run`` job: build -> train -> evaluate, one section per stage, shared values written once.

Each section is what that stage's own command reads, less what the run fills in: the base model, the
output folders, the training shards and the models to evaluate. See docs/run.md.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from .loading import ConfigModel


class RunConfig(ConfigModel):
    """The whole ``synpref run`` job."""

    base_model: str = Field(min_length=1)  # diffusers pipeline: generates round 1, is trained, is the baseline
    output_dir: str = Field(min_length=1)  # round-<r>/{build,train,eval} go under it
    seed: int = Field(0, ge=0, le=2**63 - 1)
    # rounds > 1: round r generates its candidates with round r-1's tuned model (on-policy), labels and
    # trains on them, and evaluates against the base and round r-1.
    rounds: int = Field(1, ge=1, le=100)
    # round r > 1 trains a fresh LoRA on the base ("base") or continues round r-1's LoRA ("previous").
    train_from: Literal["base", "previous"] = "base"
    build: dict[str, Any]
    train: dict[str, Any] = Field(default_factory=dict)
    evaluate: dict[str, Any]
    beam_options: list[str] = Field(default_factory=list)

    @field_validator("build", "train", "evaluate")
    @classmethod
    def _no_run_owned_keys(cls, section: dict[str, Any], info) -> dict[str, Any]:
        owned = {"build": {"beam_options"}, "train": {"pretrained_model", "shards", "output_dir"},
                 "evaluate": {"models", "output_dir", "beam_options"}}[info.field_name]
        given = sorted(owned & set(section))
        if given:
            raise ValueError(f"{', '.join(given)} is set by synpref run (base_model, output_dir, beam_options "
                             "at the top level); remove it from this section")
        if info.field_name == "build" and "output_dir" in (section.get("output") or {}):
            raise ValueError("output.output_dir is set by synpref run (round-<r>/build under output_dir)")
        return section
