"""Training configs: `file.py:arg` loading, `--config.a.b=value` overrides, and key validation.

A config file defines `get_config(arg=None)` returning an `ml_collections.ConfigDict`; `arg` is the text after
the colon, e.g. "res=448,steps=100", which `parse_arg` turns into typed values.
"""
import ast
import difflib
import importlib.util
import os
import re

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """"a=1,b=x" -> ConfigDict(a=1, b="x") typed like `defaults`; a key not in `defaults` is an error. A bare key
  ("a,b=x") sets a bool default to True; any other bare key is an error."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; known: {', '.join(sorted(defaults)) or 'none'}.")
    if not eq and not isinstance(defaults[key], bool):  # a bare key means True: only a switch may be bare
      raise ValueError(f"Config argument {key!r} needs a value ({key}=...); only a bool one may be given bare.")
    out[key] = _parse_value(value.strip(), defaults[key], f"config argument {key}") if eq else True
  return ml_collections.ConfigDict(out)


def arg_keys(arg: str | None) -> set[str]:
  """The keys a `file.py:arg` text sets: "a=1,b" -> {"a", "b"}."""
  return {item.partition("=")[0].strip() for item in filter(None, (arg or "").split(","))}


def refuse_args(given: set[str], ignored, why: str):
  """For a config whose variants use different arguments: the ones the chosen variant would ignore, if given
  (`arg_keys`), are an error saying `why`, not a silent no-op."""
  if bad := sorted(given & set(ignored)):
    raise ValueError(f"config argument{'s' * (len(bad) > 1)} {', '.join(bad)}: {why}")


def _parse_value(text: str, like, key: str):
  """`text` as a value of the type of `like` (the current value); errors name `key` as the user wrote it."""
  if isinstance(like, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"{key}: {text!r} is not a bool.")
    return text.lower() in ("true", "1")
  if isinstance(like, (int, float)) and not isinstance(like, bool):
    try:
      return type(like)(ast.literal_eval(text))
    except (ValueError, SyntaxError) as e:
      raise ValueError(f"{key}: {text!r} is not {'an int' if isinstance(like, int) else 'a float'}.") from e
  if isinstance(like, str) or like is None:
    return text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError) as e:
    raise ValueError(f"{key}: cannot parse {text!r}.") from e


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]`."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No config file {path}.")
  module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path} defines no get_config(arg=None).")
  config = module.get_config(arg or None)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f"{path}: get_config returned {type(config).__name__}, not an ml_collections.ConfigDict.")
  return config


def override_pairs(parser, rest: list[str]) -> list[tuple[str, str]]:
  """The `--config.KEY=VALUE` arguments argparse's parse_known_args left over, as (KEY, VALUE) pairs; any other
  leftover is a usage error (argparse's: message and exit status 2)."""
  pairs = []
  for item in rest:
    if not item.startswith("--config.") or "=" not in item:
      parser.error(f"unrecognised argument {item!r} (overrides look like --config.KEY=VALUE)")
    key, _, value = item[len("--config."):].partition("=")
    pairs.append((key, value))
  return pairs


def load_with_overrides(spec: str, overrides, allowed: dict | None = None) -> ml_collections.ConfigDict:
  """`load_config(spec)`, then each (KEY, VALUE) of `overrides` applied in order (see `apply_override`)."""
  config = load_config(spec)
  for key, value in overrides:
    apply_override(config, key, value, allowed)
  return config


def apply_override(config, dotted: str, text: str, allowed: dict | None = None):
  """`config.a.b[0].c = value`, value parsed like the current one. A key the config does not have yet is added
  only if the schema `allowed` (see check_keys) knows it, or inside a key whose content the schema leaves free
  (e.g. `model.llm.vocab_size`, checked where the model is built); any other unknown key is a clear error."""
  parts = re.findall(r"[^.\[\]]+|\[\d+\]", dotted)
  node, where, free = config, "config", False
  for i, part in enumerate(parts):
    last = i == len(parts) - 1
    if part.startswith("["):
      idx = int(part[1:-1])
      if not isinstance(node, (list, tuple)) or idx >= len(node):
        raise ValueError(f"config key {where}{part} does not exist.")
      if last:
        node[idx] = _parse_value(text, node[idx], f"--config.{dotted}")
      node, where = node[idx], where + part
      continue
    keys = list(node.keys()) if hasattr(node, "keys") else []
    schema = allowed if isinstance(allowed, dict) else {}
    if part not in keys and not (last and (part in schema or free and hasattr(node, "keys"))):
      hint = difflib.get_close_matches(part, keys + [k for k in schema if k not in keys], n=1)
      raise ValueError(f"Unknown config key {where}.{part}" + (f" (did you mean {hint[0]!r}?)" if hint else "") + ".")
    if last:
      value = _parse_value(text, node[part], f"--config.{dotted}") if part in keys else _parse_new(text)
      try:
        node[part] = value
      except TypeError as e:  # ml_collections keeps a field's type: e.g. a number for the stages list
        raise ValueError(f"--config.{dotted}={text}: {e}") from None
    free = free or (part in schema and schema[part] is None)
    node, where, allowed = node[part], f"{where}.{part}", schema.get(part)


def _parse_new(text: str):
  """A value for a key the config did not set: a Python literal, else the text itself."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


_UNSET = "(unset)"


def changes(old, new, where: str = "") -> list[str]:
  """"key: old -> new" for every leaf that differs between two JSON-like configs (dicts, lists, values)."""
  if isinstance(old, dict) and isinstance(new, dict):
    return [c for k in sorted(set(old) | set(new), key=str)
            for c in changes(old.get(k, _UNSET), new.get(k, _UNSET), f"{where}.{k}" if where else str(k))]
  if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
    return [c for i, (a, b) in enumerate(zip(old, new)) for c in changes(a, b, f"{where}[{i}]")]
  show = lambda value: value if value is _UNSET else repr(value)
  return [] if old == new else [f"{where}: {show(old)} -> {show(new)}"]


def check_keys(node, allowed: dict, where: str = "config"):
  """Rejects keys not in `allowed` (a dict key -> nested allowed dict, or None for a leaf of any content)."""
  for key in node.keys():
    if key not in allowed:
      hint = difflib.get_close_matches(key, list(allowed), n=1)
      raise ValueError(f"Unknown config key {where}.{key}" + (f" (did you mean {hint[0]!r}?)" if hint else "") + ".")
    sub = allowed[key]
    if isinstance(sub, dict) and node[key] is not None:
      items = node[key] if isinstance(node[key], (list, tuple)) else [node[key]]
      for i, item in enumerate(items):
        if hasattr(item, "keys"):
          check_keys(item, sub, f"{where}.{key}" + (f"[{i}]" if isinstance(node[key], (list, tuple)) else ""))
