"""The models a service offers, by name: a presets file and a models folder.

Presets (TOML; `.ini` with the same keys also works, extra args as one shell-quoted line):

    [models.chat]
    model = "/models/qwen3-0.6b-Q4_K_M.gguf"   # a file or a hub repo id
    max_seq_length = 8192
    extra_args = ["--top-k", "20"]
    ttl = 600          # seconds idle before the node may unload it
    pin = true         # never evicted

A models folder adds one entry per GGUF file, named by its file name without `.gguf` (the
first shard of a split GGUF names the model; `mmproj*` projectors are not models). A preset
wins over a file of the same name. Every value is checked here, naming the file and the key.
"""

from __future__ import annotations

import configparser
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.core.request import LoadRequest
from engine.core.rules import InvalidRequest

_SHARD = re.compile(r"-(\d{5})-of-(\d{5})$")
_FIELDS = {
    "model": "model_path",
    "variant": "gguf_variant",
    "max_seq_length": "max_seq_length",
    "cache_type_kv": "cache_type_kv",
    "speculative_type": "speculative_type",
    "chat_template": "chat_template_override",
    "extra_args": "llama_extra_args",
}


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    request: LoadRequest
    ttl: float | None = None
    pin: bool = False


def load_presets(path: Path) -> dict[str, Preset]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidRequest(f"presets file {path}: {exc.strerror}") from None
    if path.suffix.lower() == ".ini":
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read_string(text, source=str(path))
        except configparser.Error as exc:
            raise InvalidRequest(f"presets file {path}: {exc}") from None
        tables: dict[str, dict[str, Any]] = {
            name: _ini_values(path, name, dict(parser[name])) for name in parser.sections()
        }
    else:
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidRequest(f"presets file {path}: {exc}") from None
        tables = document.get("models", {})
        if not isinstance(tables, dict):
            raise InvalidRequest(f"presets file {path}: [models] must be a table of models")
    return {name: _preset(path, name, values) for name, values in tables.items()}


def _ini_values(path: Path, name: str, raw: dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = dict(raw)
    try:
        if "extra_args" in raw:
            values["extra_args"] = shlex.split(raw["extra_args"])
        for key in ("max_seq_length",):
            if key in raw:
                values[key] = int(raw[key])
        if "ttl" in raw:
            values["ttl"] = float(raw["ttl"])
        if "pin" in raw:
            values["pin"] = raw["pin"].strip().lower() in ("1", "true", "yes", "on")
    except ValueError as exc:
        raise InvalidRequest(f"presets file {path}: [{name}]: {exc}") from None
    return values


def _preset(path: Path, name: str, values: Any) -> Preset:
    where = f"presets file {path}: model {name!r}"
    if not isinstance(values, dict):
        raise InvalidRequest(f"{where}: must be a table")
    unknown = set(values) - set(_FIELDS) - {"ttl", "pin"}
    if unknown:
        raise InvalidRequest(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    if "model" not in values:
        raise InvalidRequest(f"{where}: 'model' (a .gguf file or a hub repo id) is required")
    fields = {_FIELDS[key]: value for key, value in values.items() if key in _FIELDS}
    try:
        request = LoadRequest(**fields)
    except ValueError as exc:
        raise InvalidRequest(f"{where}: {exc}") from None
    ttl, pin = values.get("ttl"), values.get("pin", False)
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl <= 0):
        raise InvalidRequest(f"{where}: ttl must be a positive number of seconds, not {ttl!r}")
    if not isinstance(pin, bool):
        raise InvalidRequest(f"{where}: pin must be true or false, not {pin!r}")
    return Preset(name, request, float(ttl) if ttl is not None else None, pin)


def scan_models_dir(folder: Path) -> dict[str, Preset]:
    if not folder.is_dir():
        raise InvalidRequest(f"models folder {folder} is not a folder")
    found: dict[str, Preset] = {}
    for path in sorted(folder.rglob("*.gguf")):
        stem = path.stem
        if stem.lower().startswith("mmproj"):
            continue
        shard = _SHARD.search(stem)
        if shard is not None:
            if int(shard.group(1)) != 1:
                continue  # llama-server is given the first shard and finds the others
            stem = stem[: shard.start()]
        found.setdefault(stem, Preset(stem, LoadRequest(model_path=str(path.resolve()))))
    return found


def build_catalog(presets: Path | None, models_dir: Path | None) -> dict[str, Preset]:
    catalog = scan_models_dir(models_dir) if models_dir is not None else {}
    if presets is not None:
        catalog.update(load_presets(presets))
    if not catalog:
        raise InvalidRequest("no models: give --preset FILE and/or --models-dir DIR")
    return catalog
