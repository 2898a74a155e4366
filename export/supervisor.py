"""`cascade serve --workers N`'s parent: it checks the bundle in a short-lived process and keeps
none of it, binds the port, and runs uvicorn's supervisor over N workers.

Loading a bundle imports onnxruntime, faiss, torch and LightGBM (~380 MiB before the bundle's own
arrays); a parent that loaded it to check it kept ~490 MiB for nothing. Here the check runs in a
spawned process (``check``), and the parent imports only uvicorn.
"""

from __future__ import annotations

import json
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from export.runtime import CascadeService

SERVE_ENV = "CASCADE_SERVE"  # the settings file each worker reads (export.serve.app_from_env)


def service_from(settings: dict[str, Any]) -> "CascadeService":
    """The service ``cascade serve`` describes: ``{bundle, threads, state, store}`` (imported
    here, not at the top: the parent of ``--workers`` never loads a bundle)."""
    from export.online import open_journal
    from export.runtime import CascadeService

    journal = open_journal(settings.get("state"), settings.get("store"))
    return CascadeService(settings["bundle"], threads=settings.get("threads", 1), journal=journal)


def _check(settings: dict[str, Any]) -> tuple[str | None, int | None]:
    from export.bundle import BundleError

    try:
        service = service_from(settings)
    except (BundleError, ValueError, OSError) as e:
        return str(e), None  # as text: the parent would import export.bundle to unpickle it
    try:
        return None, None if service.online is None else len(service.online.live)
    finally:
        service.close()


def check(settings: dict[str, Any]) -> tuple[str | None, int | None]:
    """Load the bundle ``settings`` name (verifying it, opening its journal) in a spawned process:
    (the error that refused it, or None; its online events, None without online features)."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_check, settings).result()


def workers_settings(settings: dict[str, Any]) -> Path:
    """A fresh directory where the workers keep their settings (``settings.json``, which a reload
    rewrites) and their Prometheus files (``PROMETHEUS_MULTIPROC_DIR``, so one scrape of any
    worker sums them all); the caller removes it."""
    directory = Path(tempfile.mkdtemp(prefix="cascade-serve-"))
    (directory / "prometheus").mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory / "prometheus")
    write_settings(directory / "settings.json", settings)
    os.environ[SERVE_ENV] = str(directory / "settings.json")
    return directory


def write_settings(path: Path, settings: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(settings))
    os.replace(tmp, path)
