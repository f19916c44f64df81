"""Ollama's chat templates (Go text/template) translated to the Jinja that kvslim renders.

Ollama renders a template one of two ways, and the translation keeps both:

- a template that reads ``.Messages`` runs once, with ``.System`` (the system messages'
  contents joined by a blank line), ``.Messages`` (role, content, ...) and ``.Tools``;
- an older one runs once per turn with ``.System``, ``.Prompt`` and ``.Response``; the
  last turn stops right after ``{{ .Response }}`` (that is where the answer goes).

The subset translated: text, ``{{- ... -}}`` trimming, comments, fields (``.Role``,
``$.Messages``, ``$var.Field``), ``if`` / ``else if`` / ``else`` / ``end``, ``range``
(with ``$i, $m :=`` or without, and ``else``), ``with``, ``$x := ...``, parentheses,
string / number / bool literals and the functions eq, ne, lt, le, gt, ge, and, or, not,
len, slice, index, json. Anything else raises ``TemplateError`` naming it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

__all__ = ["TemplateError", "to_jinja", "is_jinja"]


class TemplateError(ValueError):
    """A Go template using something outside the translated subset."""


_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
_TOKEN = re.compile(r'\s*(:=|=|\(|\)|,|\||"(?:\\.|[^"\\])*"|`[^`]*`|\$?[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+'
                    r"|\$[A-Za-z0-9_]*|\.|-?[0-9][0-9.eE+-]*|[A-Za-z_][A-Za-z0-9_]*)")
_ROOT = {"System": "sys_", "Prompt": "prompt_", "Response": "response_", "Messages": "messages",
         "Tools": "tools"}
_COMPARE = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}


def is_jinja(source: str) -> bool:
    """A template already in Jinja (statements ``{% %}``), not Go's."""
    return "{%" in source


def to_jinja(source: str) -> str:
    """The Jinja equivalent of an Ollama Go template (TemplateError if it cannot be)."""
    parts = _split(source)
    if any(kind == "action" and re.search(r"(^|[^A-Za-z0-9_])\.Messages\b|\$\.Messages\b", text)
           for kind, text in parts):
        body = _Translator().run(parts)
        prelude = ("{%+ set sys_ = messages | selectattr('role', 'equalto', 'system') "
                   "| map(attribute='content') | join('\\n\\n') +%}"
                   "{%+ set prompt_ = '' +%}{%+ set response_ = '' +%}")
        return prelude + body
    turn = _Translator().run(parts)
    last = _Translator(cut_after_response=True).run(parts)
    emit = "{{ turn_(ns_.sys, ns_.prompt, ns_.response) }}" \
           "{%+ set ns_.sys = '' +%}{%+ set ns_.prompt = '' +%}{%+ set ns_.response = '' +%}"
    return ("{%+ macro turn_(sys_, prompt_, response_) +%}" + turn + "{%+ endmacro +%}"
            "{%+ macro last_(sys_, prompt_, response_) +%}" + last + "{%+ endmacro +%}"
            "{%+ set ns_ = namespace(sys='', prompt='', response='') +%}"
            "{%+ for m_ in messages +%}"
            "{%+ if m_.role == 'system' +%}{%+ if ns_.prompt or ns_.response +%}" + emit +
            "{%+ endif +%}{%+ set ns_.sys = m_.content +%}"
            "{%+ elif m_.role == 'user' +%}{%+ if ns_.response +%}" + emit +
            "{%+ endif +%}{%+ set ns_.prompt = m_.content +%}"
            "{%+ elif m_.role == 'assistant' +%}{%+ set ns_.response = m_.content +%}"
            "{%+ endif +%}{%+ endfor +%}"
            "{{ last_(ns_.sys, ns_.prompt, ns_.response) }}")


def _split(source: str) -> list[tuple[str, str]]:
    """[("text", ...) | ("action", ...)], with Go's ``{{-`` / ``-}}`` trimming applied to
    the text beside them and comments dropped."""
    parts: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(source):
        text = source[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        if text:
            parts.append(("text", text))
        body = m.group(2).strip()
        if not (body.startswith("/*") and body.endswith("*/")):
            parts.append(("action", body))
        pos, trim_next = m.end(), bool(m.group(3))
    text = source[pos:]
    if trim_next:
        text = text.lstrip()
    if "{{" in text:
        raise TemplateError("an unclosed '{{' in the template")
    if text:
        parts.append(("text", text))
    return parts


@dataclass
class _Block:
    kind: str  # if | range | with
    dot: str | None  # the Jinja expression `.` stood for outside the block


@dataclass
class _Translator:
    cut_after_response: bool = False
    out: list[str] = field(default_factory=list)
    blocks: list[_Block] = field(default_factory=list)
    dot: str | None = None  # None: the top-level values
    cut: bool = False
    n: int = 0

    def run(self, parts: list[tuple[str, str]]) -> str:
        for kind, text in parts:
            if kind == "text":
                if not self.cut:
                    self.out.append(_literal(text))
            else:
                self.action(text)
        if self.blocks:
            raise TemplateError(f"'{self.blocks[-1].kind}' without its {{{{ end }}}}")
        return "".join(self.out)

    def tag(self, stmt: str) -> None:
        self.out.append("{%+ " + stmt + " +%}")

    def action(self, text: str) -> None:
        word = text.split(None, 1)[0] if text.split() else ""
        rest = text[len(word):].strip()
        if word == "if":
            self.blocks.append(_Block("if", self.dot))
            self.tag(f"if {self.expr(rest)}")
        elif word == "else":
            self.else_(rest)
        elif word == "end":
            self.end()
        elif word == "range":
            self.range_(rest)
        elif word == "with":
            self.n += 1
            var = f"w{self.n}_"
            self.blocks.append(_Block("with", self.dot))
            self.tag(f"set {var} = {self.expr(rest)}")
            self.tag(f"if {var}")
            self.dot = var
        elif word in ("define", "template", "block", "break", "continue"):
            raise TemplateError(f"'{{{{ {word} }}}}' is not translated to Jinja")
        elif re.match(r"\$[A-Za-z0-9_]*\s*:?=", text):
            name, op, value = re.match(r"(\$[A-Za-z0-9_]*)\s*(:?=)\s*(.*)", text, re.DOTALL).groups()
            if op == "=":
                raise TemplateError(f"assignment to {name} (only ':=' declarations are translated)")
            if not self.cut:
                self.tag(f"set {_var(name)} = {self.expr(value)}")
        else:
            expr = self.expr(text)
            if not self.cut:
                self.out.append("{{ " + expr + " }}")
            if self.cut_after_response and "response_" in expr and self.dot_free(text):
                self.cut = True

    def dot_free(self, text: str) -> bool:
        """Whether ``.Response`` in this action is the top-level one."""
        return self.dot is None or "$.Response" in text

    def else_(self, rest: str) -> None:
        if not self.blocks:
            raise TemplateError("'else' outside if/range/with")
        block = self.blocks[-1]
        if rest.startswith("if "):
            if block.kind != "if":
                raise TemplateError("'else if' inside range/with")
            self.tag(f"elif {self.expr(rest[3:])}")
        elif rest:
            raise TemplateError(f"'else {rest}' is not translated to Jinja")
        else:
            if block.kind == "range":  # Go's range-else runs on an empty list, as Jinja's for-else
                self.dot = block.dot
            self.tag("else")

    def end(self) -> None:
        if not self.blocks:
            raise TemplateError("'end' without if/range/with")
        block = self.blocks.pop()
        self.dot = block.dot
        self.tag("endfor" if block.kind == "range" else "endif")

    def range_(self, rest: str) -> None:
        m = re.match(r"(\$[A-Za-z0-9_]*)\s*(?:,\s*(\$[A-Za-z0-9_]*)\s*)?:=\s*(.*)", rest, re.DOTALL)
        self.n += 1
        index = None
        if m:
            first, second, rest = m.groups()
            index, item = (first, second) if second else (None, first)
            item = _var(item)
        else:
            item = f"it{self.n}_"
        iterable = self.expr(rest)
        self.blocks.append(_Block("range", self.dot))
        self.tag(f"for {item} in {iterable}")
        if index:
            self.tag(f"set {_var(index)} = loop.index0")
        self.dot = item

    # -- expressions

    def expr(self, text: str) -> str:
        tokens = _tokens(text)
        if "|" in tokens:
            raise TemplateError(f"pipelines ('|') are not translated to Jinja: '{text}'")
        value, pos = self.command(tokens, 0)
        if pos != len(tokens):
            raise TemplateError(f"cannot translate '{text}'")
        return value

    def command(self, tokens: list[str], pos: int) -> tuple[str, int]:
        """A function call (name and its operands, up to ')' or the end) or one operand."""
        if pos < len(tokens) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", tokens[pos]) \
                and tokens[pos] not in ("true", "false", "nil"):
            name, args, pos = tokens[pos], [], pos + 1
            while pos < len(tokens) and tokens[pos] != ")":
                arg, pos = self.operand(tokens, pos)
                args.append(arg)
            return _call(name, args), pos
        value, pos = self.operand(tokens, pos)
        if pos < len(tokens) and tokens[pos] not in (")",):
            raise TemplateError(f"cannot translate '{' '.join(tokens)}'")
        return value, pos

    def operand(self, tokens: list[str], pos: int) -> tuple[str, int]:
        if pos >= len(tokens):
            raise TemplateError("an expression ends early")
        tok = tokens[pos]
        if tok == "(":
            value, pos = self.command(tokens, pos + 1)
            if pos >= len(tokens) or tokens[pos] != ")":
                raise TemplateError("an unclosed '('")
            return f"({value})", pos + 1
        if tok.startswith('"'):
            return repr(json.loads(tok)), pos + 1
        if tok.startswith("`"):
            return repr(tok[1:-1]), pos + 1
        if tok in ("true", "false"):
            return tok, pos + 1
        if tok == "nil":
            return "none", pos + 1
        if re.fullmatch(r"-?[0-9][0-9.eE+-]*", tok):
            return tok, pos + 1
        if tok.startswith("$") or tok.startswith("."):
            return self.value(tok), pos + 1
        raise TemplateError(f"'{tok}' is not translated to Jinja")

    def value(self, tok: str) -> str:
        head, *fields = tok.split(".")
        if head == "$":
            base = None
        elif head:
            base = _var(head)
        else:
            base = self.dot
        if base is None:  # the top-level values
            if not fields or not fields[0]:
                raise TemplateError("'.' at the top level is not translated to Jinja")
            if fields[0] not in _ROOT:
                raise TemplateError(f"'.{fields[0]}' is not a value Ollama gives its templates")
            base, fields = _ROOT[fields[0]], fields[1:]
        for f in fields:
            if f:
                base += "." + _snake(f)
        return base


def _tokens(text: str) -> list[str]:
    tokens, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise TemplateError(f"cannot translate '{text}'")
        tokens.append(m.group(1))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return tokens


def _call(name: str, args: list[str]) -> str:
    if name in _COMPARE:
        if len(args) < 2:
            raise TemplateError(f"'{name}' needs two operands")
        if name == "eq":
            return "(" + " or ".join(f"{args[0]} == {b}" for b in args[1:]) + ")"
        return f"({args[0]} {_COMPARE[name]} {args[1]})"
    if name in ("and", "or") and args:
        return "(" + f" {name} ".join(args) + ")"
    if name == "not" and len(args) == 1:
        return f"(not {args[0]})"
    if name == "len" and len(args) == 1:
        return f"({args[0]} | length)"
    if name == "slice" and 1 <= len(args) <= 3:
        return f"{args[0]}[{':'.join(args[1:]) if len(args) > 2 else (args[1] + ':' if len(args) == 2 else ':')}]"
    if name == "index" and len(args) >= 2:
        return args[0] + "".join(f"[{a}]" for a in args[1:])
    if name == "json" and len(args) == 1:
        return f"({args[0]} | tojson)"
    raise TemplateError(f"the function '{name}' is not translated to Jinja")


def _var(name: str) -> str:
    return "v_" + (name[1:] or "root")


def _snake(name: str) -> str:
    """Go's field names as Ollama's JSON keys: ToolCalls -> tool_calls."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def _literal(text: str) -> str:
    """Template text as Jinja output: plain when Jinja would read nothing in it."""
    if "{" in text or "}" in text:  # a brace beside a tag could merge with it
        return "{{ " + repr(text) + " }}"
    return text
