"""The wizard's draft: one raw profile mapping that every step reads and writes.

The draft holds what the profile file will hold, not the fully resolved profile: a field the
user never touched stays out of it, so a new profile stays short and an opened profile that
was not changed is written back exactly as it was read (byte for byte: the original text is
kept). Values typed into fields are parsed by the type the schema declares; what cannot be
parsed is stored as typed and the schema reports it ("expected a whole number, got 'abc'").
"""

from __future__ import annotations

import copy
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from engine.profile import (
    LoadedProfile,
    Problem,
    Profile,
    ProfileError,
    dump_yaml,
    load_profile_data,
    validate_profile,
)

MISSING: Any = object()

# Keys that hold paths, relative to the folder of the profile file.
PATH_KEYS = (
    "data.train", "data.validation", "data.prep.blocklist", "inference.prompts",
    "resources.hostfile", "deepspeed.nvme_path", "model.path", "model.tokenizer",
)
SECTION_ORDER = tuple(Profile.model_fields)


def field_info(path: str) -> FieldInfo | None:
    """The schema field at a dotted path (``training.lr``), or None."""
    model: type[BaseModel] = Profile
    parts = path.split(".")
    for i, part in enumerate(parts):
        info = model.model_fields.get(part)
        if info is None:
            return None
        if i == len(parts) - 1:
            return info
        ann = info.annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return None


def default_of(path: str) -> Any:
    info = field_info(path)
    if info is None or info.is_required():
        return MISSING
    return info.get_default(call_default_factory=True)


def help_of(path: str) -> str:
    info = field_info(path)
    return (info.description or "") if info else ""


def _flat_args(ann: Any) -> list[Any]:
    """The member types and literal values of an annotation, flattened."""
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        out: list[Any] = []
        for a in typing.get_args(ann):
            out += _flat_args(a)
        return out
    if origin is Literal:
        return [("literal", v) for v in typing.get_args(ann)]
    return [origin or ann]


def parse_text(path: str, raw: str) -> Any:
    """A typed value for the text of a field, by the schema's type; unparseable text as is."""
    info = field_info(path)
    text = raw.strip()
    if info is None:
        return text
    members = _flat_args(info.annotation)
    literals = [m[1] for m in members if isinstance(m, tuple)]
    if text == "":
        return None if type(None) in members else ""
    for lit in literals:
        if str(lit) == text:
            return lit
    if bool in members:
        low = text.lower()
        if low in ("true", "yes", "on", "1"):
            return True
        if low in ("false", "no", "off", "0"):
            return False
    if int in members:
        try:
            return int(text.replace("_", ""))
        except ValueError:
            pass
    if float in members:
        try:
            return float(text)
        except ValueError:
            pass
    structured = dict in members or list in members or tuple in members
    if structured and (str not in members or text[:1] in "[{"):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            return text
    return text


def format_value(value: Any) -> str:
    """The text a field shows for a value (parse_text reads it back to the same value)."""
    if value is None or value is MISSING:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (dict, list, tuple)):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return str(value)


def _relocate(value: str, old: Path, new: Path) -> str:
    """A relative path written for a profile in ``old`` rewritten for a profile in ``new``."""
    p = Path(value).expanduser()
    if p.is_absolute() or old.resolve() == new.resolve():
        return value
    target = (old / p).resolve()
    if not target.exists():
        return value  # a hub id or a name we cannot place; leave it as written
    return os.path.relpath(target, new.resolve())


class Draft:
    """A profile being planned: the raw mapping plus where it came from."""

    def __init__(self, data: dict[str, Any], profiles_dir: Path, *, source: Path | None = None,
                 text: str | None = None):
        self.data = data
        self.profiles_dir = Path(profiles_dir)
        self.source = source
        self.original = copy.deepcopy(data)
        self.original_text = text
        self.touched: set[str] = set()  # fields the user set in this session

    # --- making one ---------------------------------------------------------------------------

    @classmethod
    def new(cls, profiles_dir: Path, name: str = "my-run") -> Draft:
        data: dict[str, Any] = {
            "name": name,
            "model": {},
            "data": {"train": ""},
            "method": {"kind": "sft"},
            "training": {},
            "deepspeed": {},
        }
        return cls(data, profiles_dir)

    @classmethod
    def open(cls, path: Path, profiles_dir: Path) -> Draft:
        """Read a profile file as it is (no defaults filled in); ProfileError if unreadable."""
        path = Path(path).resolve()
        data, text = load_profile_data(path)
        return cls(data, profiles_dir, source=path, text=text)

    # --- reading and writing fields -------------------------------------------------------------

    @property
    def source_dir(self) -> Path:
        return self.source.parent if self.source else self.profiles_dir

    def get(self, path: str, default: Any = MISSING) -> Any:
        node: Any = self.data
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def value(self, path: str) -> Any:
        """What the field means: the draft's value, else the schema default."""
        v = self.get(path)
        return default_of(path) if v is MISSING else v

    def has(self, path: str) -> bool:
        return self.get(path) is not MISSING

    def set(self, path: str, value: Any) -> None:
        parts = path.split(".")
        node = self.data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                if i == 0:
                    self._insert_section(part, nxt)
                else:
                    node[part] = nxt
            node = nxt
        node[parts[-1]] = value

    def _insert_section(self, name: str, value: dict[str, Any]) -> None:
        """Add a top-level section in schema order (name, model, data, method, ...)."""
        if name not in SECTION_ORDER:
            self.data[name] = value
            return
        rank = SECTION_ORDER.index(name)
        items = list(self.data.items())
        at = len(items)
        for i, (k, _) in enumerate(items):
            if k in SECTION_ORDER and SECTION_ORDER.index(k) > rank:
                at = i
                break
        items.insert(at, (name, value))
        self.data.clear()
        self.data.update(items)

    def put(self, path: str, value: Any) -> None:
        """Set a field the user edited. A value equal to the default is left out of the file
        unless the file already spelled the key out."""
        self.touched.add(path)
        if not self.has(path) and value == default_of(path) and value is not MISSING:
            return
        self.set(path, value)

    def unset(self, path: str) -> None:
        parts = path.split(".")
        node: Any = self.data
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                return
            node = node[part]
        if isinstance(node, dict):
            node.pop(parts[-1], None)

    # --- the whole profile ----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return str(self.get("name", "") or "")

    @property
    def changed(self) -> bool:
        return self.cleaned() != self.original

    def cleaned(self) -> dict[str, Any]:
        """The mapping to save: empty sections the original did not have are dropped."""
        out = copy.deepcopy(self.data)
        for key in list(out):
            if out[key] == {} and self.original.get(key) != {}:
                del out[key]
        return out

    def target_path(self) -> Path:
        return self.profiles_dir / f"{self.name}.yaml"

    def for_target(self) -> dict[str, Any]:
        """The mapping with relative paths rewritten for the folder it is saved in."""
        data = self.cleaned()
        old, new = self.source_dir, self.profiles_dir
        if old.resolve() == new.resolve():
            return data
        tmp = Draft(data, new)
        for key in PATH_KEYS:
            v = tmp.get(key)
            if isinstance(v, str) and v:
                tmp.set(key, _relocate(v, old, new))
            elif isinstance(v, list):
                tmp.set(key, [_relocate(x, old, new) if isinstance(x, str) else x for x in v])
        return tmp.data

    def to_yaml(self) -> str:
        """The text Save writes: the original text when nothing changed, else the mapping."""
        target = self.target_path().resolve()
        if (self.original_text is not None and self.source is not None
                and self.source.resolve() == target and not self.changed):
            return self.original_text
        return dump_yaml(self.for_target())

    def validate(self, *, check_data: bool = False, check_model: bool = False
                 ) -> tuple[LoadedProfile | None, list[Problem]]:
        """Validate through the profile schema, as if saved to ``profiles/NAME.yaml``."""
        try:
            lp = validate_profile(copy.deepcopy(self.for_target()), source=self.target_path(),
                                  check_data=check_data, check_model=check_model)
        except ProfileError as exc:
            return None, exc.problems
        return lp, []

    def save(self) -> Path:
        """Write ``profiles/NAME.yaml``; the draft then counts as opened from there."""
        target = self.target_path()
        target.parent.mkdir(parents=True, exist_ok=True)
        text = self.to_yaml()
        data = self.for_target()
        target.write_text(text, encoding="utf-8")
        self.source = target.resolve()
        self.data = data
        self.original = copy.deepcopy(self.cleaned())
        self.original_text = text
        return target

    def relative(self, path: Path) -> str:
        """A path as this draft spells it: relative to the folder of its profile file."""
        path = Path(path).resolve()
        try:
            return os.path.relpath(path, self.source_dir.resolve())
        except ValueError:  # another drive (Windows)
            return str(path)

    def resolve(self, value: str | None) -> Path | None:
        if not value:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.source_dir / p).resolve()
