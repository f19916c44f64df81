"""``kvslim run``'s answers and interactive chat, as Ollama's ``run`` gives them.

Two backends answer: ``Local`` (an ``LLM`` in this process) and ``Remote`` (a running
``kvslim serve``, through ``kvslim.client``); the chat (``Repl``) and the printing are
the same for both. Chat commands (``/set``, ``/show``, ``/load``, ``/save``, ``/clear``,
``/bye``, ``/?``) are handled here and never sent to the model. Ctrl-C stops an answer
and keeps the session (the request is cancelled: the stream is closed); Ctrl-D exits.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generator, Iterator

__all__ = ["Stats", "Local", "Remote", "Repl", "WordWrap", "PARAMETERS", "print_stats",
           "print_cache_info", "line_reader", "read_message", "parse_parameter"]

# Ollama's /set parameter names that kvslim honours, with their value types
PARAMETERS: dict[str, type] = {
    "num_ctx": int, "num_predict": int, "temperature": float, "top_k": int, "top_p": float,
    "min_p": float, "seed": int, "stop": str, "repeat_penalty": float, "repeat_last_n": int,
    "presence_penalty": float, "frequency_penalty": float,
}
SESSION_KEY = "kvslim_session"  # marks a file written by /save


def parse_parameter(name: str, values: list[str]):
    """The typed value of ``/set parameter NAME VALUE...``; ValueError says what is wrong."""
    kind = PARAMETERS.get(name)
    if kind is None:
        raise ValueError(f"unknown parameter '{name}'; kvslim knows {', '.join(PARAMETERS)}")
    if not values:
        raise ValueError(f"no value for parameter '{name}'")
    if name == "stop":  # every word is a stop string, as Ollama's
        return list(values)
    try:
        return kind(values[0])
    except ValueError:
        raise ValueError(f"parameter '{name}' takes {'an integer' if kind is int else 'a number'}, "
                         f"got '{values[0]}'") from None


# ---------------------------------------------------------------- statistics


@dataclass
class Stats:
    """One answer's figures (seconds), as ``--verbose`` prints them. The kernel compile
    is its own figure: it happens before the prompt is evaluated, never inside a rate."""

    prompt_eval_count: int
    prompt_eval_duration: float
    eval_count: int
    eval_duration: float
    total_duration: float
    load_duration: float = 0.0
    compile_duration: float = 0.0
    prompt_cache_count: int = 0  # prompt tokens reused (prefix cache, --prompt-cache)


def print_stats(s: Stats, err=None) -> None:
    err = err or sys.stderr
    rows = [("total duration", _dur(s.total_duration)), ("load duration", _dur(s.load_duration))]
    if s.compile_duration:
        rows.append(("kernel compile", f"{_dur(s.compile_duration)} (once per machine; not in "
                                       f"the rates)"))
    rows += [
        ("prompt eval count", f"{s.prompt_eval_count} token(s)"),
        *([("prompt cache count", f"{s.prompt_cache_count} token(s)")]
          if s.prompt_cache_count else []),
        ("prompt eval duration", _dur(s.prompt_eval_duration)),
        ("prompt eval rate", _rate(s.prompt_eval_count, s.prompt_eval_duration)),
        ("eval count", f"{s.eval_count} token(s)"),
        ("eval duration", _dur(s.eval_duration)),
        ("eval rate", _rate(s.eval_count, s.eval_duration)),
    ]
    for name, value in rows:
        print(f"{name + ':':<22}{value}", file=err)


def print_cache_info(i: dict, err=None) -> None:
    """``LLM.kv_cache_info()`` (or a server's /api/ps entry in that shape), one line a fact."""
    fused = "fused" if i["fused"] else "dequantize + SDPA"
    lines = [
        ("kv cache types", f"K {i['type_k']} / V {i['type_v']} "
                           f"(asked for {i['requested_k']} / {i['requested_v']})"),
        ("kv cache fallback", f"yes: {i['reason']}" if i["fallback"] else "none"),
        ("kv cache bytes", f"{i['bytes']:,} ({_size(i['bytes'])}; {i['bytes_per_token']:,} B/token "
                           f"x {i['capacity_tokens']:,} tokens)"),
        ("attention", f"{i['backend']} ({fused}) on {i['device']}, flash {i['flash_attn']}"),
        ("kv coding", f"rotation {i['kv_rotation']}, centering {i['kv_centering']}, "
                      f"rounding {i['kv_rounding']}"
                      + (f" ({i['kv_codec_note']})" if i.get("kv_codec_note") else "")),
    ]
    if i.get("kv_auto"):
        lines.append(("kv cache auto", f"KLD {i['kv_measured_kld']:.5f} vs f16 (budget "
                                       f"{i['kv_max_kld']:g}; {i['kv_auto_candidates']} pairs measured)"))
    for name, value in lines:
        print(f"{name + ':':<22}{value}", file=err or sys.stderr)


def _dur(s: float) -> str:
    """Durations the way Go prints them (ollama --verbose): 1.234s, 12.3ms, 45µs."""
    if s >= 1:
        return f"{s:.6f}".rstrip("0").rstrip(".") + "s"
    if s >= 1e-3:
        return f"{s * 1e3:.4f}".rstrip("0").rstrip(".") + "ms"
    return f"{s * 1e6:.1f}µs"


def _rate(n: int, s: float) -> str:
    return f"{n / s:.2f} tokens/s" if s > 0 else "n/a"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


# ---------------------------------------------------------------- backends


class Reply:
    """Text pieces of one answer; ``stats`` (what the pieces' generator returns) once it
    has ended. ``close()`` cancels it."""

    def __init__(self, pieces: Generator[str, None, Stats]):
        self._pieces, self.stats, self.text = pieces, None, ""

    def __iter__(self) -> Iterator[str]:
        while True:
            try:
                piece = next(self._pieces)
            except StopIteration as end:
                self.stats = end.value
                return
            self.text += piece
            yield piece

    def close(self) -> None:
        self._pieces.close()


def _sampling(options: dict) -> dict:
    """Ollama option names -> ``LLM.chat`` keywords (num_ctx is the cache's, not sampling)."""
    return {k: v for k, v in options.items() if k != "num_ctx"}


class Local:
    """An ``LLM`` in this process. ``load(name)`` builds another with the same settings.

    continues: token ids of a plain prompt (a ``--prompt-cache`` saved with ``--raw``)
    that every answer continues: the last message's text is appended to them as is, with
    no chat template."""

    def __init__(self, llm, loader: Callable[[str], object], truncate: bool = False,
                 warmup: tuple[float, bool] = (0.0, False), continues: list[int] | None = None):
        self.llm, self._loader, self.truncate = llm, loader, truncate
        self.continues = continues
        seconds, compiled = warmup  # a compile is its own figure; loading cached code, load's
        self._pending = (llm.load_duration + (0.0 if compiled else seconds),
                         seconds if compiled else 0.0)  # reported with the first answer

    @property
    def model(self) -> str:
        return self.llm.name

    def chat(self, messages: list[dict], options: dict) -> Reply:
        from kvslim.chat import fit_chat, prompt_limit

        self._fit_ctx(options.get("num_ctx"))
        sampling = _sampling(options)
        if self.continues is not None:
            ids = self.continues + self.llm.tokenize(messages[-1]["content"], add_special=False)
            return Reply(self._pieces(self.llm.generate(ids, stream=True, truncate=self.truncate,
                                                        **sampling)))
        limit = prompt_limit(self.llm.kv_cache_info()["num_ctx"], sampling.get("num_predict"))
        messages = fit_chat(self.llm.chat_prompt, messages, limit)[0]
        stream = self.llm.chat(messages, stream=True, truncate=self.truncate, **sampling)
        return Reply(self._pieces(stream))

    def _pieces(self, stream) -> Generator[str, None, Stats]:
        t0 = time.perf_counter()
        try:
            yield from stream
        finally:
            stream.close()
        c = stream.completion
        load, compile_s = self._pending
        self._pending = (0.0, 0.0)
        return Stats(c.prompt_eval_count, c.prompt_eval_duration, c.eval_count, c.eval_duration,
                     load + compile_s + time.perf_counter() - t0, load, compile_s,
                     c.prompt_cache_count)

    def _fit_ctx(self, num_ctx: int | None) -> None:
        if num_ctx and num_ctx != self.llm.kv_cache_info()["num_ctx"]:
            self.llm.reconfigure(num_ctx=num_ctx)

    def cache_info(self) -> dict:
        return self.llm.kv_cache_info()

    def info(self) -> list[tuple[str, str]]:
        c, i = self.llm.config, self.llm.kv_cache_info()
        return [("architecture", c.arch), ("parameters", _count(c.n_params)),
                ("context length", str(c.context_length)), ("embedding length", str(c.d_model)),
                ("quantization", c.file_type_name or "?"),
                ("kv cache", f"K {i['type_k']} / V {i['type_v']}, num_ctx {i['num_ctx']}")]

    def template(self) -> str:
        return self.llm.tokenizer.chat_template

    def load(self, name: str) -> None:
        self.llm = self._loader(name)
        self._pending = (self.llm.load_duration, 0.0)
        self.continues = None  # the prompt cache was the other model's


class Remote:
    """A running ``kvslim serve``: every answer is a streamed ``/api/chat``."""

    def __init__(self, client, model: str, request_options: dict | None = None,
                 keep_alive=None, think=None, truncate: bool = True):
        self.client, self.model = client, model
        self.request_options = request_options or {}  # the cache flags, sent with every request
        self.keep_alive, self.think, self.truncate = keep_alive, think, truncate

    def _body(self, **fields) -> dict:
        body = {"model": self.model, **fields}
        if self.keep_alive is not None:
            body["keep_alive"] = self.keep_alive
        return body

    def ensure(self, err=None) -> None:
        """Pull the model through the server when it does not have it (as ``ollama run``)."""
        from kvslim.client import ServerError

        if self.client.has(self.model):
            return
        err = err or sys.stderr
        try:
            for status in self.client.pull(self.model):
                if status.get("status") and err.isatty():  # progress on a terminal only
                    print(status["status"], file=err)
        except ServerError as e:
            if e.status is not None and e.status >= 500:
                raise
            raise ServerError(f"model '{self.model}' is not on the server and cannot be pulled: "
                              f"{e}", e.status) from None

    def preload(self) -> None:
        """Load the model now (the empty request), so the first answer does not wait for it."""
        self.client.request("POST", "/api/chat", self._body(messages=[]), timeout=None)

    def chat(self, messages: list[dict], options: dict) -> Reply:
        options = dict(options)
        fmt = options.pop("format", None)  # --format: a field of the request, not an option
        body = self._body(messages=messages, stream=True, truncate=self.truncate,
                          options={**self.request_options, **options})
        if fmt is not None:
            body["format"] = fmt
        if self.think is not None:
            body["think"] = self.think
        return Reply(self._pieces(self.client.stream("/api/chat", body)))

    def _pieces(self, objects: Generator[dict, None, None]) -> Generator[str, None, Stats]:
        """Message pieces; the final object's statistics (nanoseconds) as the return value."""
        try:
            for obj in objects:
                text = (obj.get("message") or {}).get("content", "")
                if text:
                    yield text
                if obj.get("done"):
                    return Stats(
                        obj.get("prompt_eval_count", 0), obj.get("prompt_eval_duration", 0) / 1e9,
                        obj.get("eval_count", 0), obj.get("eval_duration", 0) / 1e9,
                        obj.get("total_duration", 0) / 1e9, obj.get("load_duration", 0) / 1e9,
                        prompt_cache_count=obj.get("prompt_cache_count", 0))
        finally:
            objects.close()
        from kvslim.client import ServerError

        raise ServerError("the server's answer ended without its final statistics")

    def cache_info(self) -> dict:
        for m in self.client.ps():
            if m["model"] in (self.model, f"{self.model}:latest"):
                return {**m["kv_cache"], **m["attention"], "device": m["device"]}
        raise ValueError(f"model '{self.model}' is no longer loaded on the server")

    def info(self) -> list[tuple[str, str]]:
        show = self.client.show(self.model)
        d, mi = show.get("details") or {}, show.get("model_info") or {}
        arch = mi.get("general.architecture", d.get("family", "?"))
        rows = [("architecture", arch), ("parameters", d.get("parameter_size", "?")),
                ("context length", str(mi.get(f"{arch}.context_length", "?"))),
                ("embedding length", str(mi.get(f"{arch}.embedding_length", "?"))),
                ("quantization", d.get("quantization_level", "?"))]
        return rows + [("server", self.client.address)]

    def template(self) -> str:
        return self.client.show(self.model).get("template", "")

    def load(self, name: str) -> None:
        old, self.model = self.model, name
        try:
            self.ensure()
            self.preload()
        except BaseException:
            self.model = old
            raise


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


# ---------------------------------------------------------------- output


def compile_kernels(types: list[str], always_say: bool = False, err=None) -> tuple[float, bool]:
    """``kvslim.warmup`` before a model loads: when it will compile (a new machine), say
    so, with a spinner on a terminal. (seconds spent, whether it compiled)."""
    from kvslim import warmup

    err = err or sys.stderr
    warmup.check_types(types)
    compiling = warmup.needs_compile()
    if not compiling and not always_say:
        return warmup.warmup(types), False
    message = warmup.MESSAGE if compiling else "loading the compiled CPU kernels"
    if err.isatty():
        from rich.console import Console

        with Console(file=err, highlight=False).status(message):
            seconds = warmup.warmup(types)
    else:
        print(f"{message} ...", file=err, flush=True)
        seconds = warmup.warmup(types)
    if compiling:
        print(f"compiled CPU kernels in {seconds:.1f} s (cached for later runs)", file=err,
              flush=True)
    return seconds, compiling



class WordWrap:
    """Streams text to ``out``, breaking lines at spaces before ``width`` columns, as
    Ollama's ``run`` does on a terminal (``--nowordwrap`` turns it off: width None).
    A word (and the space before it) is held until it ends, so no word is split across
    lines and no line ends in a space."""

    def __init__(self, out, width: int | None):
        self.out, self.width = out, width
        self.col, self.word, self.spaces = 0, "", 0

    def write(self, text: str) -> None:
        if not self.width:
            self.out.write(text)
            return
        for ch in text:
            if ch == "\n":
                self._flush_word()
                self.out.write("\n")
                self.col, self.spaces = 0, 0
            elif ch == " ":
                self._flush_word()
                self.spaces += 1
            else:
                self.word += ch
                if len(self.word) >= self.width:  # longer than a line: cut it
                    self._flush_word()

    def _flush_word(self) -> None:
        if not self.word:
            return
        if self.col and self.col + self.spaces + len(self.word) > self.width:
            self.out.write("\n")
            self.col, self.spaces = 0, 0
        self.out.write(" " * self.spaces + self.word)
        self.col += self.spaces + len(self.word)
        self.word, self.spaces = "", 0

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        """Write the word held back (the end of the answer)."""
        if self.width:
            self._flush_word()
        self.out.flush()


def wrap_width(out, enabled: bool) -> int | None:
    """Ollama's wrap width (the terminal's, less 5) when ``out`` is a terminal."""
    if not enabled or not getattr(out, "isatty", lambda: False)():
        return None
    return max(20, shutil.get_terminal_size().columns - 5)


def answer(backend, messages: list[dict], options: dict, *, verbose: bool = False,
           wrap: bool = True, out=None, err=None) -> str:
    """Stream one answer to ``out``; ``--verbose`` statistics and cache facts to ``err``."""
    out, err = out or sys.stdout, err or sys.stderr
    printer = WordWrap(out, wrap_width(out, wrap))
    reply = backend.chat(messages, options)
    try:
        for piece in reply:
            printer.write(piece)
            printer.flush()
    finally:
        reply.close()
        printer.close()
    out.write("\n\n" if out.isatty() else "\n")
    out.flush()
    if verbose:
        print_stats(reply.stats, err)
        print_cache_info(backend.cache_info(), err)
    return reply.text


# ---------------------------------------------------------------- the interactive chat

HELP = '''Available Commands:
  /set            Set session variables
  /show           Show model information
  /load <model>   Load a session file or another model
  /save <file>    Save your current session (model, system, parameters, messages)
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command
  /? shortcuts    Help for keyboard shortcuts

Use """ to begin a multi-line message.'''

HELP_SET = '''Available Commands:
  /set parameter ...     Set a parameter
  /set system <string>   Set system message
  /set verbose           Show LLM stats
  /set quiet             Disable LLM stats
  /set wordwrap          Enable wordwrap
  /set nowordwrap        Disable wordwrap'''

HELP_SHOW = '''Available Commands:
  /show info         Show details for this model
  /show parameters   Show parameters for this model
  /show system       Show system message
  /show template     Show prompt template'''

HELP_PARAMETERS = '''Parameters:
  /set parameter seed <int>             Random number seed
  /set parameter num_predict <int>      Max number of tokens to predict
  /set parameter top_k <int>            Pick from top k num of tokens
  /set parameter top_p <float>          Pick token based on sum of probabilities
  /set parameter min_p <float>          Pick token based on top token probability * min_p
  /set parameter num_ctx <int>          Set the context size
  /set parameter temperature <float>    Set creativity level
  /set parameter repeat_penalty <float> How strongly to penalize repetitions
  /set parameter repeat_last_n <int>    Set how far back to look for repetitions
  /set parameter presence_penalty <float>
  /set parameter frequency_penalty <float>
  /set parameter stop <string> <string> ...   Set the stop parameters'''

HELP_SHORTCUTS = '''Available keyboard shortcuts:
  Ctrl + a            Move to the beginning of the line (Home)
  Ctrl + e            Move to the end of the line (End)
  Alt + b             Move back (left) one word
  Alt + f             Move forward (right) one word
  Ctrl + k            Delete the sentence after the cursor
  Ctrl + u            Delete the sentence before the cursor
  Ctrl + w            Delete the word before the cursor
  Up / Down           Previous / next message (history)

  Ctrl + l            Clear the screen
  Ctrl + c            Stop the model from responding
  Ctrl + d            Exit (/bye)'''


class Repl:
    """Ollama's interactive chat over a backend; ``handle(line)`` is one input line."""

    def __init__(self, backend, options: dict | None = None, system: str | None = None,
                 verbose: bool = False, wrap: bool = True, out=None, err=None):
        self.backend, self.options, self.system = backend, dict(options or {}), system
        self.verbose, self.wrap = verbose, wrap
        self.messages: list[dict] = []
        self.out, self.err = out or sys.stdout, err or sys.stderr

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def run(self, read: Callable[[str], str]) -> int:
        """Read, answer, repeat, until /bye or Ctrl-D; 0."""
        while True:
            try:
                line = read_message(read)
            except EOFError:
                self.say("")
                return 0
            except KeyboardInterrupt:  # at the prompt: Ollama's hint, not an exit
                self.say("\nUse Ctrl + d or /bye to exit.")
                continue
            if line is not None and not self.handle(line):
                return 0

    def handle(self, line: str) -> bool:
        """One message or command; False when the chat should end."""
        if line.startswith("/"):
            return self.command(line)
        self.ask(line)
        return True

    def ask(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        head = [{"role": "system", "content": self.system}] if self.system else []
        try:
            reply = answer(self.backend, head + self.messages, self.options, verbose=self.verbose,
                           wrap=self.wrap, out=self.out, err=self.err)
        except KeyboardInterrupt:  # stop this answer, keep the session
            self.messages.pop()
            self.say("")
            return
        except (ValueError, RuntimeError, OSError) as e:  # e.g. one message longer than the context
            self.messages.pop()
            print(f"Error: {' '.join(str(e).split())}", file=self.err, flush=True)
            return
        self.messages.append({"role": "assistant", "content": reply})

    # ---------------------------------------------------------------- commands

    def command(self, line: str) -> bool:
        words = line.split()
        verb, args = words[0], words[1:]
        if verb in ("/bye", "/exit"):
            return False
        handler = {"/clear": self._clear, "/set": self._set, "/show": self._show,
                   "/load": self._load, "/save": self._save, "/?": self._help,
                   "/help": self._help}.get(verb)
        if handler is None:
            self.say(f"Unknown command '{verb}'. Type /? for help")
            return True
        try:
            handler(args, line)
        except (ValueError, OSError, RuntimeError) as e:
            print(f"Error: {' '.join(str(e).split())}", file=self.err, flush=True)
        return True

    def _clear(self, args, line) -> None:
        self.messages.clear()
        self.say("Cleared session context")

    def _help(self, args, line) -> None:
        topic = args[0] if args else ""
        self.say({"set": HELP_SET, "show": HELP_SHOW, "shortcuts": HELP_SHORTCUTS,
                  "shortcut": HELP_SHORTCUTS}.get(topic.lstrip("/"), HELP))

    def _set(self, args, line) -> None:
        what = args[0] if args else ""
        if what == "parameter":
            if len(args) < 2:
                self.say(HELP_PARAMETERS)
                return
            name = args[1]
            self.options[name] = parse_parameter(name, args[2:])
            shown = " ".join(args[2:]) if name == "stop" else args[2]
            self.say(f"Set parameter '{name}' to '{shown}'")
        elif what == "system":
            text = line.split(None, 2)[2] if len(args) > 1 else ""
            self.system = text.strip().strip('"') or None
            self.say("Set system message.")
        elif what in ("verbose", "quiet"):
            self.verbose = what == "verbose"
            self.say(f"Set '{what}' mode.")
        elif what in ("wordwrap", "nowordwrap"):
            self.wrap = what == "wordwrap"
            self.say("Set 'wordwrap' mode." if self.wrap else "Set 'nowordwrap' mode.")
        else:
            self.say(HELP_SET if not what else f"Unknown command '/set {what}'. Type /? for help")

    def _show(self, args, line) -> None:
        what = args[0] if args else ""
        if what == "info":
            self.say("  Model")
            for name, value in self.backend.info():
                self.say(f"    {name:<20}{value}")
        elif what == "parameters":
            if not self.options:
                self.say("No parameters were specified for this model.")
                return
            self.say("User defined parameters:")
            for name, value in self.options.items():
                for v in value if isinstance(value, list) else [value]:
                    self.say(f"{name:<30}{v}")
        elif what == "system":
            self.say(self.system or "No system message was specified for this model.")
        elif what == "template":
            self.say(self.backend.template() or "No prompt template was specified for this model.")
        else:
            self.say(HELP_SHOW if not what else f"Unknown command '/show {what}'. Type /? for help")

    def _save(self, args, line) -> None:
        if len(args) != 1:
            self.say("Usage:\n  /save <file>")
            return
        path = Path(args[0]).expanduser()
        session = {SESSION_KEY: 1, "model": self.backend.model, "system": self.system,
                   "options": self.options, "messages": self.messages}
        path.write_text(json.dumps(session, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        self.say(f"Saved session to '{path}'")

    def _load(self, args, line) -> None:
        if len(args) != 1:
            self.say("Usage:\n  /load <model or session file>")
            return
        session = _read_session(Path(args[0]).expanduser())
        if session is None:
            self.say(f"Loading model '{args[0]}'")
            self.backend.load(args[0])
            self.messages.clear()
            return
        if session["model"] != self.backend.model:
            self.say(f"Loading model '{session['model']}'")
            self.backend.load(session["model"])
        self.system, self.options = session.get("system"), dict(session.get("options") or {})
        self.messages = list(session.get("messages") or [])
        self.say(f"Loaded session '{args[0]}' ({len(self.messages)} messages)")


def _read_session(path: Path) -> dict | None:
    """A /save file's session, or None when ``path`` is not one (then it names a model)."""
    if path.suffix == ".gguf" or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and data.get(SESSION_KEY) else None


# ---------------------------------------------------------------- reading lines


def read_message(read: Callable[[str], str]) -> str | None:
    """One message: a line, or lines between triple quotes (None for a blank line)."""
    line = read(">>> ")
    if not line.strip():
        return None
    if not line.lstrip().startswith('"""'):
        return line.strip() if line.lstrip().startswith("/") else line
    lines = [line.lstrip()[3:]]  # multi-line until a closing """
    while not lines[-1].rstrip().endswith('"""') or len(lines) == 1 and lines[0].strip() == "":
        lines.append(read("... "))
    lines[-1] = lines[-1].rstrip()[:-3]
    return "\n".join(lines).strip("\n") or None


def history_path() -> Path:
    return Path.home() / ".kvslim" / "history"


def line_reader() -> Callable[[str], str]:
    """Line editing with history: prompt_toolkit on a terminal (history in
    ~/.kvslim/history), else ``input`` (with readline's editing where it exists)."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        try:
            return _prompt_toolkit_reader()
        except ImportError:
            pass
    try:
        import readline  # noqa: F401 - importing it gives input() line editing and history
    except ImportError:
        pass
    return input


def _prompt_toolkit_reader() -> Callable[[str], str]:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.formatted_text import HTML
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    try:
        history_path().parent.mkdir(parents=True, exist_ok=True)
        history = FileHistory(str(history_path()))
    except OSError:
        history = InMemoryHistory()
    session = PromptSession(history=history)
    hint = HTML("<style color='ansibrightblack'>Send a message (/? for help)</style>")

    def read(prompt: str) -> str:
        return session.prompt(prompt, placeholder=hint if prompt == ">>> " else None)

    return read
