"""A Hugging Face dataset card (README.md) for a build output.

Its YAML header declares two configs, ``ranked`` and ``pairs``, with their
features, so ``datasets.load_dataset(output_dir, "ranked")`` works even though
k varies between samples (see ``schemas/hf_features.py``).
"""
from __future__ import annotations

from typing import Any

import yaml


SYN_PIC = (" (Syn-Pic win rate: each image's share of strict wins over all rewards and all other candidates"
           " of its prompt)")


def dataset_card(manifest: dict[str, Any]) -> str:
    import datasets

    from ..schemas.hf_features import features_from_manifest

    infos = []
    for name in ("ranked", "pairs"):
        info = datasets.DatasetInfo(features=features_from_manifest(manifest, name))._to_yaml_dict()
        infos.append({"config_name": name, **info})
    header = {
        "configs": [{"config_name": name, "data_files": [{"split": "train", "path": f"{name}/*.tar"}]}
                    for name in ("ranked", "pairs")],
        "dataset_info": infos,
        "tags": ["synthetic", "preference", "text-to-image", "syn-pic", "webdataset"],
    }
    c = manifest["counts"]
    rewards = ", ".join(f"{r['name']} (v{r['version']}{', filter only' if r.get('rank') is False else ''})"
                        for r in manifest["rewards"])
    generators = ", ".join(f"{g['id']} ({g['model']})" for g in manifest["generators"])
    body = f"""# Synthetic ranked preferences (synpref {manifest['synpref_version']})

Built with synpref: candidates from {generators}, scored by {rewards},
labelled with the `{manifest['aggregator']}` aggregator{SYN_PIC if manifest['aggregator'] == 'syn_pic' else ''}.

| | in | written | dropped |
|---|---|---|---|
| prompts | {c['prompts']['in']} | {c['prompts']['written']} | {c['prompts']['dropped_total']} |
| candidates | {c['candidates']['in']} | {c['candidates']['written']} | {c['candidates']['dropped_total']} |
| pairs | {c['pairs']['in']} | {c['pairs']['written']} | {c['pairs']['dropped_total']} |

Drop reasons are in `manifest.json`, every dropped record in `dead_letter/`.

- `ranked`: one sample per prompt; `img0.png` ... in rank order (img0 = best), `json` with the prompt, each
  candidate's rank, phi, raw reward scores and generation lineage.
- `pairs`: one sample per kept pair: `win.png`, `lose.png`, `json` with the reward agreement.

```python
import datasets
ranked = datasets.load_dataset("<this folder>", "ranked", split="train")
```
"""
    return "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n" + body
