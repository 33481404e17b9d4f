"""Typed run configs: a dataclass per entry point, filled from YAML presets and the command line.

Each entry point (text SFT/RM/PPO, image RM/DDPO) declares one dataclass, with nested
sub-dataclasses for shared parts (one PPO config serves text and image). OmegaConf's structured
configs check keys and types against that dataclass, so a typo in a preset fails at start-up with
a one-line message naming the key and the file, instead of being silently ignored for hours.

Merge order, lowest to highest: dataclass defaults < YAML file < explicit fields (CLI flags such
as ``--model``; ``None`` means "not given") < ``key=value`` overrides (dotted keys).
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import re
from pathlib import Path, PurePath
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf, StringNode
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, MissingMandatoryValue, OmegaConfBaseException

__all__ = ["ConfigError", "load_config", "save_config", "config_dict", "import_function"]


class ConfigError(ValueError):
    """A config that cannot be built: unknown key, wrong type, missing value, malformed override.

    A ValueError so that callers (the CLI) can report it as a user error, in one line.
    """


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    """All dotted key paths of a (structured) config: the candidates for 'did you mean'."""
    keys: list[str] = []
    if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
        for k in node.keys():
            path = f"{prefix}{k}"
            keys.append(path)
            child = node._get_node(k)
            if isinstance(child, DictConfig):
                keys.extend(_dotted_keys(child, path + "."))
    return keys


# What TRL (PPO/DDPO), ddpo-pytorch and transformers' TrainingArguments call a setting that align names otherwise,
# by the last part of the key. TRL's DDPO prefixes its settings (train_learning_rate, sample_eta, ...): see _PREFIXES.
_PEER_NAMES = {"learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs", "output_dir": "out",
               "model_name_or_path": "model", "bf16": "mixed_precision", "fp16": "mixed_precision",
               "logging_steps": "log_every", "save_steps": "save_every", "rank": "r", "lora_alpha": "alpha",
               "lora_dropout": "dropout", "init_kl_coef": "kl_coef", "adap_kl_ctrl": "adaptive",
               "target_kl": "early_stop_kl", "cliprange": "clip_range", "cliprange_value": "clip_range_value",
               "num_ppo_epochs": "ppo_epochs", "response_length": "max_new_tokens", "adv_clip_max": "adv_clip",
               "score_clip": "reward_clip", "reward_clip_range": "reward_clip", "use_score_scaling": "scale_reward",
               "save_total_limit": "keep_checkpoints"}
_PREFIXES = ("train_", "sample_", "per_prompt_stat_tracking_", "lora_")


def _suggest(full_key: str, known: list[str]) -> str | None:
    """Nearest known key. First a key whose last part is the same name (or the name a peer library uses for it:
    ppo.kl_coef -> ppo.kl.kl_coef, learning_rate -> lr), nearest the unknown key's parent; then a close spelling
    among the siblings, then anywhere in the tree."""
    parent, _, leaf = full_key.rpartition(".")
    names = [leaf] + [leaf[len(p):] for p in _PREFIXES if leaf.startswith(p)]
    names += [_PEER_NAMES[n] for n in names if n in _PEER_NAMES]
    for name in names:
        same = [k for k in known if k.rpartition(".")[2] == name]
        if same:
            return min(same, key=lambda k: (k.rpartition(".")[0] != parent, len(k)))
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
    match = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
    if match:
        return siblings[match[0]]
    match = difflib.get_close_matches(full_key, known, n=1, cutoff=0.6)
    return match[0] if match else None


def _as_config_error(err: OmegaConfBaseException, source: str, schema: DictConfig) -> ConfigError:
    """Turn OmegaConf's multi-line message into one line that names the key and where it came from."""
    full_key = getattr(err, "full_key", None)
    first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, ConfigKeyError) and full_key:
        hint = _suggest(str(full_key), _dotted_keys(schema))
        msg = f"unknown key '{full_key}'" + (f" (did you mean '{hint}'?)" if hint else "")
    elif isinstance(err, MissingMandatoryValue) and full_key:
        msg = f"missing required value for '{full_key}'"
    elif full_key and isinstance(getattr(err, "child_node", None), ListConfig):  # a scalar given for a list
        msg = f"bad value for '{full_key}': expected a list such as [a, b], got {getattr(err, 'value', None)!r}"
    elif full_key and isinstance(err, InterpolationResolutionError):
        msg = (f"bad value for '{full_key}': {first_line} (a ${{...}} in a value is an OmegaConf interpolation: "
               f"${{lr}} is another key's value, ${{oc.env:HOME}} an environment variable; \\${{ is a literal ${{)")
    elif full_key:
        msg = f"bad value for '{full_key}': {first_line}"
    else:
        msg = first_line
    return ConfigError(f"{source}: {msg}")


def _scalar_for_group(schema: DictConfig, layer: Any, prefix: str = "") -> str | None:
    """The dotted key of a sub-config (e.g. lora) that `layer` sets to a plain value (lora: 8): OmegaConf's
    error for it names no key."""
    items = OmegaConf.to_container(layer) if isinstance(layer, DictConfig) else layer
    for k, value in (items.items() if isinstance(items, dict) else ()):
        node = schema._get_node(k) if isinstance(schema, DictConfig) and k in schema else None
        if isinstance(node, DictConfig):
            if not isinstance(value, dict):
                return f"{prefix}{k}"
            found = _scalar_for_group(node, value, f"{prefix}{k}.")
            if found:
                return found
    return None


def _merge(base: DictConfig, layer: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        group = None if getattr(err, "full_key", None) else _scalar_for_group(base, layer)
        if group:
            node = OmegaConf.select(base, group)
            raise ConfigError(f"{source}: '{group}' is a group of settings ({', '.join(f'{group}.{k}' for k in node)}), "
                              f"not a value: set them by name, e.g. {group}: {{{next(iter(node))}: ...}} or "
                              f"{group}.{next(iter(node))}=...") from err
        raise _as_config_error(err, source, base) from err


def _string_node(cfg: DictConfig, key: str, optional: bool = False) -> bool:
    """Whether the dotted `key` of the schema is a str field (with `optional`: an Optional[str] one)."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node._get_node(part)
    return isinstance(node, StringNode) and (not optional or node._is_optional())


def _check_string_bools(cfg: DictConfig, layer: Any, source: str, prefix: str = "") -> None:
    """YAML 1.1 reads a bare no/yes/off/on/false/true as a boolean; a str field would get 'False'.
    Fail naming the key instead (the value meant, e.g. mixed_precision: no, cannot be recovered)."""
    if not isinstance(layer, DictConfig):
        return
    for k in layer.keys():
        key, value = f"{prefix}{k}", layer._get_node(k)
        if isinstance(value, DictConfig):
            _check_string_bools(cfg, value, source, f"{key}.")
        elif isinstance(value._value(), bool) and _string_node(cfg, key):
            raise ConfigError(f"{source}: '{key}' is a string, but YAML read the bare value as the boolean "
                              f"{value._value()}: quote it (e.g. {k}: 'no')")


def _yaml_error(err: Exception, path) -> str:
    """PyYAML's error in one line: where and what ("line 2, column 1: found duplicate key lr"). Its first line alone
    ("while constructing a mapping") says neither."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or not problem:
        return str(err).splitlines()[0]
    try:
        line = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()[mark.line]
    except (OSError, IndexError):
        line = ""
    tab = " (a tab: YAML indents with spaces)" if line[mark.column:mark.column + 1] == "\t" else ""
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}{tab}"


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{'ppo.lr': 1} -> {'ppo': {'lr': 1}}, so explicit fields may also use dotted keys."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def load_config(cls, config_path=None, overrides: Iterable[str] = (), section: str | None = None, **fields):
    """Build an instance of the dataclass `cls` from defaults, a YAML file, fields and overrides.

    cls: a dataclass type (or instance, whose values then act as the defaults); may nest
        sub-dataclasses.
    config_path: optional YAML file; its keys must exist in `cls`.
    overrides: ``key=value`` strings (dotted keys, values parsed as YAML: ``ppo.epochs=2``).
    section: a preset may hold one block per command under a top-level ``stages:`` mapping
        (``stages: {sft: ..., rm: ..., ppo: ...}``); ``section`` picks the block for this command.
    fields: explicit values, e.g. from CLI flags; ``None`` means "not given" and is skipped, so
        a flag's default never hides the YAML value.
    Raises ConfigError naming the key and its source (file, field or override) in one line.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"load_config expects a dataclass, got {cls!r}")
    try:
        cfg: DictConfig = OmegaConf.structured(cls)
    except OmegaConfBaseException as err:  # a schema bug (e.g. an unsupported annotation)
        raise ConfigError(f"{getattr(cls, '__name__', cls)}: {str(err).splitlines()[0]}") from err

    if config_path is not None:
        source = str(config_path)
        try:
            loaded = OmegaConf.load(config_path)
        except FileNotFoundError as err:
            raise ConfigError(f"{source}: no such config file") from err
        except Exception as err:
            raise ConfigError(f"{source}: cannot parse YAML: {_yaml_error(err, config_path)}") from err
        if loaded is None:  # an empty file
            loaded = OmegaConf.create({})
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{source}: expected a mapping of keys at the top level")
        if "stages" in loaded:
            if set(loaded.keys()) != {"stages"}:
                raise ConfigError(f"{source}: a file with 'stages:' must hold nothing else at the top level")
            if not isinstance(loaded.stages, DictConfig):  # every block commented out, or a list
                raise ConfigError(f"{source}: 'stages:' must map each command to its block (stages: {{sft: ...}})")
            if section is None:
                raise ConfigError(f"{source}: a preset with one block per training command (stages: "
                                  f"{', '.join(loaded.stages.keys())}); this command takes a file of its own keys")
            if section not in loaded.stages:
                raise ConfigError(f"{source}: no 'stages.{section}' block (has: {', '.join(loaded.stages.keys())})")
            loaded, source = loaded.stages[section], f"{source} (stages.{section})"
            if loaded is None:  # a block whose keys are all commented out
                loaded = OmegaConf.create({})
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"{source}: expected a mapping of keys, got {type(loaded).__name__}")
        _check_string_bools(cfg, loaded, source)
        cfg = _merge(cfg, loaded, source)

    given = {k: v for k, v in fields.items() if v is not None}
    for key, value in given.items():  # one at a time, so the error names the field
        cfg = _merge(cfg, _nest({key: value}), f"argument {key}={value!r}")

    if isinstance(overrides, str):  # a lone string would otherwise be split into characters
        overrides = [overrides]
    for item in overrides:
        key, eq, raw = str(item).partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"override '{item}': expected key=value (e.g. ppo.epochs=2)")
        try:
            # a str field takes the text as written (YAML would turn mixed_precision=no into False); null unsets an
            # optional one (pretrained=null), as it does in a YAML file
            unset = raw.strip() in ("null", "~") and _string_node(cfg, key.strip(), optional=True)
            layer = (OmegaConf.create(_nest({key.strip(): raw})) if _string_node(cfg, key.strip()) and not unset
                     else OmegaConf.from_dotlist([str(item)]))
        except OmegaConfBaseException as err:
            raise ConfigError(f"override '{item}': {str(err).splitlines()[0]}") from err
        head = key.strip().split(".")[0]
        if "." in key and head not in cfg:  # ddpo-pytorch's nested names (sample.batch_size, train.learning_rate):
            hint = _suggest(key.strip().replace(".", "_"), _dotted_keys(cfg))  # OmegaConf would name only `sample`
            raise ConfigError(f"override '{item}': unknown key '{key.strip()}'"
                              + (f" (did you mean '{hint}'?)" if hint else ""))
        cfg = _merge(cfg, layer, f"override '{item}'")

    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        where = str(config_path) if config_path is not None else getattr(cls, "__name__", "config")
        raise _as_config_error(err, where, cfg) from err


def _plain(value: Any) -> Any:
    """Paths and enums as strings: YAML/JSON readers should not need Python object tags."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.name
    return value


def config_dict(cfg) -> dict:
    """A plain, resolved dict of builtin types (for JSON, TensorBoard hparams, reports).

    A loaded config's values are final: a string holding a literal ``${`` (written ``\\${``) is not read again as
    an interpolation."""
    if isinstance(cfg, DictConfig):
        return _plain(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    return _plain(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg)


def _escape_interpolations(value: Any) -> Any:
    """Strings as OmegaConf reads them back literally: ``${`` as ``\\${`` (and a backslash before it doubled)."""
    if isinstance(value, dict):
        return {k: _escape_interpolations(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape_interpolations(v) for v in value]
    if isinstance(value, str):
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    return value


def save_config(cfg, path) -> None:
    """Write the resolved config as YAML (atomically): the record of exactly what a run used.

    The file loads back with `load_config(type(cfg), path)`.
    """
    from align.runner import atomic_write_text  # runner imports torch; keep config import light

    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(_escape_interpolations(config_dict(cfg)))))


def import_function(spec: str, what: str = "function"):
    """The callable a `module:function` or `path/to/file.py:function` spec names (rewards, judges, monitors).

    As with `python -m`, a module in the working directory is found even when run from the `align`
    script (whose sys.path starts at its own folder). A ValueError names `what`, the spec and the cause."""
    import importlib
    import importlib.util
    import os
    import sys
    from pathlib import Path
    module, _, name = spec.rpartition(":")
    if not module or not name:
        raise ValueError(f"{what} {spec!r}: expected module:function or file.py:function")
    try:
        if module.endswith(".py"):
            path = Path(module).expanduser()
            if not path.is_file():
                raise ImportError(f"no such file {str(path)!r}")
            mod_spec = importlib.util.spec_from_file_location(f"_align_user_{path.stem}", path)
            mod = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = mod  # dataclasses and pickling look their module up here
            mod_spec.loader.exec_module(mod)
        else:
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as e:
                if e.name != module.split(".")[0] or os.getcwd() in sys.path:
                    raise
                sys.path.insert(0, os.getcwd())
                mod = importlib.import_module(module)
        fn = getattr(mod, name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{what} {spec!r}: cannot import {name!r} from {module!r}: {e}") from e
    if not callable(fn):
        raise ValueError(f"{what} {spec!r}: {module}.{name} is not callable")
    return fn
