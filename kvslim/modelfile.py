"""Modelfiles (Ollama's ``kvslim create -f Modelfile``) and the parameters a model card keeps.

    FROM smollm2                 a store name, a built-in name or a .gguf path
    PARAMETER temperature 0.2    the options kvslim honours (``PARAMETERS``)
    PARAMETER stop "<|im_end|>"  (repeatable)
    SYSTEM \"\"\"You are terse.\"\"\"  the system message of chats that have none
    TEMPLATE \"\"\"...\"\"\"           a Go template (translated, kvslim.gotemplate) or Jinja
    LICENSE \"\"\"...\"\"\"

ADAPTER, MESSAGE, REQUIRES and unknown parameters are a clear error: kvslim cannot honour
them. ``render`` writes a model's card back as a Modelfile (``kvslim show --modelfile``).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from kvslim import store
from kvslim.gotemplate import TemplateError, is_jinja, to_jinja

__all__ = ["PARAMETERS", "Modelfile", "parse", "create", "render", "chat_template",
           "check_parameters", "sampling_defaults"]

# the options kvslim honours as a model's defaults, with their types (Ollama's names)
PARAMETERS = {
    "num_ctx": int, "num_predict": int, "temperature": float, "top_k": int, "top_p": float,
    "min_p": float, "seed": int, "stop": str, "repeat_penalty": float, "repeat_last_n": int,
    "presence_penalty": float, "frequency_penalty": float,
}
_SKIP = re.compile(r"(\s|#[^\n]*)*")
_WORD = re.compile(r"([A-Za-z]+)[ \t]*")
UNSUPPORTED = {"ADAPTER": "LoRA adapters", "MESSAGE": "preset messages",
               "REQUIRES": "a minimum Ollama version"}


@dataclass
class Modelfile:
    source: str | None = None  # FROM
    parameters: dict = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    license: str | None = None


def parse(text: str) -> Modelfile:
    """A Modelfile's instructions (ValueError naming the line for anything kvslim cannot honour)."""
    mf, pos = Modelfile(), 0
    while True:
        pos = _SKIP.match(text, pos).end()  # blank lines and comments
        if pos >= len(text):
            break
        m = _WORD.match(text, pos)
        if not m:
            raise ValueError(f"Modelfile line {_line(text, pos)}: expected an instruction")
        value, block, pos = _value(text, m.end())
        _apply(mf, m.group(1).upper(), value if block else _unquote(value), _line(text, m.start()))
    if not mf.source:
        raise ValueError("the Modelfile has no FROM line")
    return mf


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _value(text: str, pos: int) -> tuple[str, bool, int]:
    """(value, whether it was a \"\"\"-quoted block, position after it) at ``pos``: the
    rest of the line, or a block of any number of lines."""
    if text.startswith('"""', pos):
        end = text.find('"""', pos + 3)
        if end < 0:
            raise ValueError(f"Modelfile line {_line(text, pos)}: unclosed \"\"\"")
        return text[pos + 3:end], True, end + 3
    end = text.find("\n", pos)
    end = len(text) if end < 0 else end
    return text[pos:end].strip(), False, end


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value[1:-1]
    return value


def _apply(mf: Modelfile, word: str, value: str, line: int) -> None:
    where = f"Modelfile line {line}"
    if word == "FROM":
        mf.source = value
    elif word == "PARAMETER":
        name, _, raw = value.partition(" ")
        name = name.lower()
        typed = check_parameters({name: _unquote(raw.strip())}, where)[name]
        if name == "stop":
            mf.parameters.setdefault("stop", []).append(typed)
        else:
            mf.parameters[name] = typed
    elif word in ("TEMPLATE", "SYSTEM", "LICENSE"):
        setattr(mf, word.lower(), value)
    elif word in UNSUPPORTED:
        raise ValueError(f"{where}: {word} ({UNSUPPORTED[word]}) is not supported by kvslim")
    else:
        raise ValueError(f"{where}: unknown instruction {word}")


def check_parameters(params: dict, where: str = "parameters") -> dict:
    """``params`` with each value of its kvslim type (a stop list stays a list); ValueError
    for a parameter kvslim does not honour or a value of the wrong type."""
    out = {}
    for name, value in params.items():
        kind = PARAMETERS.get(name)
        if kind is None:
            raise ValueError(f"{where}: PARAMETER {name} is not supported by kvslim "
                             f"(supported: {', '.join(PARAMETERS)})")
        if name == "stop":
            out[name] = [str(v) for v in value] if isinstance(value, list) else str(value)
            continue
        try:
            number = float(value)
            if kind is int and number != int(number):
                raise ValueError
            out[name] = kind(number)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: PARAMETER {name} needs {'an integer' if kind is int else 'a number'}, "
                             f"not {value!r}") from None
    return out


def chat_template(template: str) -> str:
    """The Jinja kvslim renders for a TEMPLATE (Go, translated; or Jinja as it is)."""
    if is_jinja(template):
        return template
    try:
        return to_jinja(template)
    except TemplateError as e:
        raise ValueError(f"TEMPLATE cannot be used by kvslim: {e}") from None


def sampling_defaults(card: store.ModelCard) -> dict:
    """A card's parameters as sampling options (num_ctx sizes the cache, not sampling)."""
    return {k: v for k, v in card.parameters.items() if k != "num_ctx"}


def create(name: str, mf: Modelfile, base: Path | None = None) -> Path:
    """Store model ``name`` made from a parsed Modelfile: its FROM model's file (linked)
    with the FROM model's card updated by the Modelfile's lines. A FROM path is read
    relative to ``base`` (the Modelfile's directory)."""
    source = mf.source
    if store.lookup(source) is None and store.find(source) is None and base is not None:
        candidate = base / Path(source).expanduser()
        if candidate.is_file():
            source = str(candidate)
    old = store.card(store.resolve(source))
    card = store.ModelCard(
        chat_template=chat_template(mf.template) if mf.template else old.chat_template,
        template=mf.template if mf.template else old.template,
        system=mf.system if mf.system is not None else old.system,
        parameters={**old.parameters, **mf.parameters},
        license=mf.license if mf.license is not None else old.license,
    )
    return store.copy_model(source, name, card)


def render(name: str, card: store.ModelCard) -> str:
    """A Modelfile that would make this model again (``show --modelfile``)."""
    lines = ["# Modelfile generated by kvslim", f"FROM {name}"]
    if card.template:
        lines.append(f'TEMPLATE """{card.template}"""')
    if card.system:
        lines.append(f'SYSTEM """{card.system}"""')
    lines += [f"PARAMETER {k} {_param_text(v)}" for k, vs in card.parameters.items()
              for v in (vs if isinstance(vs, list) else [vs])]
    if card.license:
        lines.append(f'LICENSE """{card.license}"""')
    return "\n".join(lines) + "\n"


def render_parameters(card: store.ModelCard) -> str:
    """Ollama's ``parameters`` text: one ``name value`` line each."""
    return "".join(f"{k:<30} {_param_text(v)}\n" for k, vs in card.parameters.items()
                   for v in (vs if isinstance(vs, list) else [vs]))


def _param_text(value) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value)
