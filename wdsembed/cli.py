"""Command line: arguments -> EmbedConfig -> a run function (the Prefect flow), with a progress bar and summary.

The options are generated from EmbedConfig's fields: a field's flag is its name with dashes (`--batch-size`), its
help is the field's description, its choices come from a Literal type, and a new field gets a flag without any
change here. FLAG_NAMES (wdsembed.config: messages name flags through it too) keeps the shorter names the command
had before (`--model`, `--num-threads`); the field's own name works as well.
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import os
import signal
import sys
import time
import types
import typing
from typing import Any, Callable, Collection, Optional, Sequence

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from wdsembed import fidelity, report
from wdsembed.config import (FLAG_NAMES, EmbedConfig, credentials_in_url, field_default, flag,
                             refuse_credentials_in_url, speaking_to)
from wdsembed.output import MANIFEST_NAME
from wdsembed.progress import RunProgress, format_duration, format_rate
from wdsembed.report import TERMINAL, ManifestNotWritten, describe_gpu_use, describe_model, embedded_rows, one_line
from wdsembed.storeoptions import url_has_credentials

DEMO_MODEL = "vit_base_patch16_clip_224.openai"
DEMO_INPUT = "demo-data"
DEMO_OUTPUT = "demo-output"
# What the same command does again after a run that stopped: outputs are written whole, and found finished.
RESUME = "run the same command again to finish the rest (finished shards are not recomputed)"

SHORT_FLAGS = {"output": "-o"}
METAVARS = {
    "output": "OUTPUT", "model_name": "NAME", "checkpoint": "FILE", "index_cache_dir": "DIR", "dask_address": "URL",
    "result_storage": "URL", "id_column": "NAME", "embedding_column": "NAME", "error_column": "NAME",
    "storage_options": "KEY=VALUE", "image_extensions": "EXT[,EXT...]",
}


def _prog() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python flows/embed.py" if name == "embed.py" else "wdsembed"


def build_parser() -> argparse.ArgumentParser:
    # SUPPRESS: only the options given appear in the namespace; every default is EmbedConfig's own.
    p = argparse.ArgumentParser(
        prog=_prog(),
        description="Embed WebDataset image shards with a timm model; one parquet per shard with an embedding "
        "column. Without INPUT and --output, runs a built-in demo on generated shards.",
        argument_default=argparse.SUPPRESS,
    )
    for name, field in EmbedConfig.model_fields.items():
        _add_option(p, name, field)
    return p


def flag_names(name: str) -> list[str]:
    """The option strings of a field, as the parser has them (none for the positional INPUT)."""
    if name == "input":
        return []
    field = EmbedConfig.model_fields[name]
    own = name.replace("_", "-")
    names = list(dict.fromkeys([FLAG_NAMES.get(name, own), own]))
    if _unwrap_optional(field.annotation) is bool:
        prefix = "--no-" if field.default is True else "--"
        return [prefix + n for n in names]
    return ["--" + n for n in names] + ([SHORT_FLAGS[name]] if name in SHORT_FLAGS else [])


def _unwrap_optional(annotation: Any) -> Any:
    """X for Optional[X], else the annotation itself."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _help(field: FieldInfo, default: Any = None) -> str:
    text = field.description or ""
    # Shown unless the description already says it (max_image_pixels explains its default in words).
    if default not in (None, {}, ()) and not field.is_required() and "default" not in text.lower():
        text += f" Default: {','.join(default) if isinstance(default, tuple) else default}."
    return text.replace("%", "%%")  # argparse formats help with %


def _add_option(p: argparse.ArgumentParser, name: str, field: FieldInfo) -> None:
    annotation = _unwrap_optional(field.annotation)
    origin = typing.get_origin(annotation)
    default = None if field.is_required() else field_default(name)
    if name == "input":
        p.add_argument("input", nargs="?", default=None, help=_help(field) + " Omit it and --output to run the demo.")
        return
    flags = flag_names(name)
    common = dict(dest=name, metavar=METAVARS.get(name))
    if annotation is bool:
        if default is True:
            p.add_argument(*flags, dest=name, action="store_false", help="Turn off (default on): " + _help(field))
        else:
            p.add_argument(*flags, dest=name, action="store_true", help=_help(field))
    elif origin is typing.Literal:
        choices = typing.get_args(annotation)
        p.add_argument(*flags, dest=name, choices=choices, type=_unquoted(str, choices), help=_help(field, default))
    elif origin is tuple:
        p.add_argument(*flags, **common, type=_comma_list, action="extend",
                       help=_help(field, default) + " Comma-separated or repeated; replaces the default.")
    elif origin is dict:
        p.add_argument(*flags, **common, type=_key_value, action="append",
                       help=_help(field) + " One KEY=VALUE per flag; repeat it for more.")
    elif annotation in (str, int, float):
        metavar = common["metavar"] or ("N" if annotation in (int, float) else None)
        typed = str if annotation is str else _unquoted(annotation)  # str refuses none: EmbedConfig's checks say it
        p.add_argument(*flags, dest=name, metavar=metavar, type=typed, help=_help(field, default))
    else:
        raise TypeError(f"EmbedConfig.{name}: no command-line form for {field.annotation!r}; add one to cli.py")


def _unquoted(convert: Callable[[str], Any], choices: Sequence[str] = ()) -> Callable[[str], Any]:
    """`convert` as argparse's type: argparse's refusal of a value ('invalid int value: ...', 'invalid choice: ...')
    quotes it whole, so one holding credentials (a URL pasted after the wrong flag) is refused without it first."""
    def typed(text: str) -> Any:
        if url_has_credentials(text):
            with speaking_to("command"):
                what = (f"choice (choose from {', '.join(map(repr, choices))})" if choices
                        else f"{convert.__name__} value")
                raise argparse.ArgumentTypeError(f"invalid {what}: {credentials_in_url(text)}")
        return convert(text)

    typed.__name__ = convert.__name__  # argparse names the type in its own 'invalid int value: 'abc''
    return typed


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        if url_has_credentials(text):  # not quoted, as below
            with speaking_to("command"):
                raise argparse.ArgumentTypeError(f"takes KEY=VALUE; {credentials_in_url(text)}")
        raise argparse.ArgumentTypeError(f"takes KEY=VALUE, got {text!r}")
    return key.strip(), value


def values_from_args(args: argparse.Namespace) -> dict:
    """The EmbedConfig fields given on the command line, in the model's types (absent ones keep their default)."""
    values = {}
    for name, field in EmbedConfig.model_fields.items():
        if getattr(args, name, None) is None:
            continue
        value = getattr(args, name)
        origin = typing.get_origin(_unwrap_optional(field.annotation))
        if origin is tuple:
            value = tuple(value)
        elif origin is dict:
            value = dict(value)
        values[name] = value
    return values


def config_from_args(args: argparse.Namespace) -> EmbedConfig:
    return EmbedConfig(**values_from_args(args))


def prepare_demo(values: dict) -> None:
    """Write a few small shards of generated images and point the run at them, offline."""
    from wdsembed.synthetic import refresh_demo_dataset

    values["input"] = os.path.abspath(DEMO_INPUT)
    values.setdefault("output", os.path.abspath(DEMO_OUTPUT))
    values.setdefault("model_name", DEMO_MODEL)
    # No network here is assumed: the demo's model runs on random weights unless a checkpoint is given.
    if not values.get("checkpoint"):
        values["pretrained"] = False
    # A few dozen images: one worker loads one model, instead of two competing for a small machine's cores.
    values.setdefault("n_workers", 1)
    written = refresh_demo_dataset(values["input"])  # unchanged shards kept as they are: a second demo run resumes
    weights = "checkpoint " + values["checkpoint"] if values.get("checkpoint") else "random weights, offline"
    shards = (f"wrote generated shards to {values['input']}" if written
              else f"generated shards in {values['input']}, unchanged")
    print(f"demo: {shards}; model {values['model_name']} ({weights})")


def refused_values(exc: ValidationError) -> list[str]:
    """Each of the errors in the command's words, one line each: the field as the flag its user typed
    (`--num-threads: Input should be greater than or equal to 1`, not num_threads_per_worker)."""
    lines = []
    for err in exc.errors():
        loc = [flag(str(err["loc"][0])), *map(str, err["loc"][1:])] if err["loc"] else []  # none: over several fields
        message = err["msg"].removeprefix("Value error, ")  # pydantic's words for a validator's own message
        lines.append(f"{' '.join(loc)}: {message}" if loc else message)
    return lines


def refuse_unusable(config: EmbedConfig) -> bool:
    """Every check that needs no work, cheapest and most basic first; raises ValueError saying what to change.
    Returns whether every output is already finished (plan.check_config)."""
    from wdsembed.plan import check_config

    return check_config(config)


def main(run: Optional[Callable[..., dict]] = None, argv: Optional[Sequence[str]] = None, *,
         on_checked: Optional[Callable[[], None]] = None) -> int:
    """The command line. `run(config, on_shard_done=..., all_finished=...)` does the work (`all_finished`: the
    checks' answer, whether every output is already finished): the Prefect flow, given by the installed
    `wdsembed` command (flows.command:main) and by `python flows/embed.py` (this package never imports the flow).
    `on_checked()` is called once every check has passed, before `run` is imported and called: the command starts
    its Prefect API server there, in the background, so that it boots while the flow's modules are imported; a
    ValueError it raises is a refusal too (exit 2, its one line)."""
    _dump_stacks_on_sigusr1()
    _write_any_character()
    # From the start: the checks take seconds (torch's import, the model's build, the footers read), and a SIGTERM
    # there killed the command with no word, its API server's process left loading, holding its stderr. Once, to
    # the end: installed again for the run, the signals had their default (a kill) in between. argv None: this
    # process ends after main, and its exit's cleanup (the API server stopped) stays covered too.
    with _stop_signals_end_as_ctrl_c(through_exit=argv is None) as stops:
        try:
            checked = _checked(run, argv, on_checked)
        except KeyboardInterrupt as exc:  # nothing written yet (a claim taken is released)
            _say_last(f"\nrun interrupted{_by(exc)} before any work (during its checks): nothing was written; run "
                      "the same command again")
            return _interrupted_code(exc)
        if isinstance(checked, int):
            return checked
        config, all_finished, claim = checked
        from wdsembed import outputclaim

        with outputclaim.handed_on(claim) if claim is not None else contextlib.nullcontext():
            return _run(run, config, all_finished, stops)


def _checked(run: Optional[Callable[..., dict]], argv: Optional[Sequence[str]],
             on_checked: Optional[Callable[[], None]]) -> "int | tuple[EmbedConfig, bool, Any]":
    """main's arguments and checks: the exit code of a refusal, else the config, whether every output is already
    finished, and OUTPUT's claim where it is taken already (_claim_store_output), else None."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # The messages below (and argparse's) quote these whole; EmbedConfig refuses the fields it takes.
    wildcard = extra and args.input is not None and not any(e.startswith("-") for e in extra)
    try:
        with speaking_to("command"):
            for value in [args.input, *extra] if extra else []:
                refuse_credentials_in_url("INPUT" if wildcard or value is args.input else "an unrecognized argument",
                                       value)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if wildcard:
        # `wdsembed /data/*.tar -o out`: the shell expanded the wildcard into one argument per shard (argparse named
        # every one of them, at 2,000 shards a screenful, as unrecognized)
        folder = os.path.dirname(args.input) or "."
        print(f"error: INPUT is one folder, brace pattern, .tar or .txt list of shards, but {1 + len(extra):,} paths "
              f"were given ({args.input}, {extra[0]}{', ...' if len(extra) > 1 else ''}): a wildcard the shell "
              f"expanded? Pass the folder that holds them ({folder}), or a brace pattern in quotes "
              f"('{folder}/{{00000..00099}}.tar')", file=sys.stderr)
        return 2
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    values = values_from_args(args)
    if values.get("input") is None and not values.get("output"):
        prepare_demo(values)
    elif values.get("input") is None:  # an empty $DATA, say: never the demo into the user's own folder
        print("error: INPUT is required with --output (the demo runs only when neither is given)", file=sys.stderr)
        return 2
    elif not values.get("output"):
        print("error: --output is required with INPUT", file=sys.stderr)
        return 2
    try:
        with speaking_to("command"):  # a validator's message names other fields by their flags
            config = EmbedConfig(**values)
    except ValidationError as exc:
        for line in refused_values(exc):
            print(f"error: {line}", file=sys.stderr)
        return 2
    try:
        with speaking_to("command"):  # its advice names the flags (pass --id-column ...)
            all_finished = refuse_unusable(config)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if run is None:  # a `wdsembed` script installed before the command moved to flows.command:main
        print("error: this wdsembed script is out of date: reinstall the package (pip install -e .), or run "
              "python flows/embed.py", file=sys.stderr)
        return 2
    try:
        claim = _claim_store_output(config)
    except (ValueError, OSError) as exc:  # another run's claim, access denied, no S3 store at the endpoint
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if on_checked is not None:
        try:
            on_checked()
        except ValueError as exc:  # what the run's own setup cannot do (the Prefect server's folder), said as above
            print(f"error: {exc}", file=sys.stderr)
            if claim is not None:
                claim.release()
            return 2
        except BaseException:  # Ctrl-C while the server loads: the claim is not left to go stale
            if claim is not None:
                claim.release()
            raise
    return config, all_finished, claim


def _claim_store_output(config: EmbedConfig) -> Any:
    """OUTPUT's claim (wdsembed.outputclaim), taken as the checks end where OUTPUT is on a store (S3 ...), and held
    for the run (outputclaim.handed_on). Its PUT is the first request that writes there: keys that may list and read
    OUTPUT but not write to it, or an endpoint that serves no S3, are refused by it now, in a second, before the
    Prefect server serves and Dask starts (refused at the run's own claim, that was 8 s later). A local folder's
    write is checked without writing (preflight.check_output_writable): its claim is left to the run, so that a
    run refused meanwhile (by the Prefect server's checks) leaves no folder behind. None there."""
    from wdsembed import outputclaim, storage

    fs, _ = storage.filesystem(config.output, config.storage_options)
    if storage.is_local(fs):
        return None
    with speaking_to("command"):
        return outputclaim.take(config)


def _run(run: Callable[..., dict], config: EmbedConfig, all_finished: bool, stops: "_StopSignals") -> int:
    """main's run, once every check passed: its summary, or what stopped it. Once its result is known, a stop
    signal no longer interrupts it (`stops`): the command ends with the run's own exit code."""
    from wdsembed.decoderlog import decoder_messages_to_log

    progress = _Progress()
    try:
        # The decoder's own stderr lines (a bad JPEG's, repeated) go to the log: the worker processes that the run
        # starts inherit this, and every bad image's reason is in its row and the summary.
        with decoder_messages_to_log(), progress:
            manifest = run(config, on_shard_done=progress.update, all_finished=all_finished)
            stops.run_ended()
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP: every output written so far is whole, and the same
        # command goes on from it. Counted by the progress bar: a shard can still finish as the run stops, after its
        # last update, which the line allows for.
        _say_last(f"\nrun interrupted{_by(exc)}: {progress.so_far()}the shards finished so far are in "
                  f"{config.output}; {RESUME}")
        return _interrupted_code(exc)
    except Exception as exc:  # noqa: BLE001 - a failed run prints its reason, not a traceback wall
        stops.run_ended()
        from wdsembed.outputclaim import OutputClaimedError

        if isinstance(exc, OutputClaimedError):  # another run took the output since the checks: refused as they do
            print(f"error: {exc}", file=sys.stderr)
            return 2
        manifest = getattr(exc, "manifest", None)
        if isinstance(manifest, dict):  # some shards failed; the summary lists each reason once, with its shards
            print_summary(manifest)
            failed, finished = manifest.get("failed_shards") or {}, len(report.this_run_shards(manifest))
            if not failed:  # every shard written, but the run failed as a whole: its fidelity check, or its manifest
                print(f"\nrun failed: {_reason(exc)}", file=sys.stderr)
                if isinstance(exc, ManifestNotWritten):  # the same command writes it
                    _print_manifest_hint(config, finished)
                return 1
            print(f"\nrun failed: {len(failed)} of {len(failed) + finished} shard(s) failed (reasons above)",
                  file=sys.stderr)
            manifest_failure = (getattr(exc, "failures", None) or {}).get(MANIFEST_NAME)
            if manifest_failure:  # after the shards' (often of the same cause: a full disk)
                print(f"and the manifest was not written: {manifest_failure}", file=sys.stderr)
            # ShardsFailed says which failures may pass on a retry; None: not known
            _print_manifest_hint(config, finished, failed, getattr(exc, "transient", None))
            return 1
        print(f"\nrun failed: {_reason(exc)}", file=sys.stderr)
        _print_manifest_hint(config, progress.finished)
        return 1
    print_summary(manifest)
    return 0


DUMP_STACKS = "WDSEMBED_DUMP_STACKS_ON_SIGUSR1"


def _dump_stacks_on_sigusr1() -> None:
    """With WDSEMBED_DUMP_STACKS_ON_SIGUSR1 set, SIGUSR1 writes every thread's stack to stderr and the command goes
    on: where a run that does not end is stuck (the tests send it to a command that outlives its stop)."""
    if os.environ.get(DUMP_STACKS) and hasattr(signal, "SIGUSR1"):
        import faulthandler

        faulthandler.register(signal.SIGUSR1, all_threads=True)


def _reason(exc: BaseException) -> str:
    """An exception's message, or its type's name where it has none (a bare TimeoutError said nothing)."""
    return str(exc) or type(exc).__name__


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill PID, systemd, Kubernetes, Slurm's scancel, `timeout`) or SIGHUP (an ssh session dropped, a
    terminal closed) raised where Ctrl-C raises KeyboardInterrupt, so that the run ends as it does on Ctrl-C: its
    cluster closed, its claim on OUTPUT released, one line saying how to go on."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signal = signal.Signals(signum)


def _by(exc: KeyboardInterrupt) -> str:
    return f" by {exc.signal.name}" if isinstance(exc, Terminated) else ""


def _interrupted_code(exc: KeyboardInterrupt) -> int:
    """As a shell reports a command ended by the signal: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""
    return 128 + exc.signal if isinstance(exc, Terminated) else 128 + signal.SIGINT


# Their default kills the process on the spot: the run's claim on OUTPUT was left behind (another host waited
# 3 minutes to take it over), and nothing said how to go on.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class _StopSignals:
    """The handler of STOP_SIGNALS: Terminated until the run's result is known (run_ended). After that, while its
    summary prints and the process's exit stops the API server, a stop signal was a kill by default: a run that had
    written its outputs and manifest exited 143 with no word. It now ends with the run's own code, and says once
    that the signal came too late to stop anything. Ctrl-C too, from then on (it ended on a KeyboardInterrupt
    traceback); before, it keeps Python's own handler (KeyboardInterrupt: the run interrupted)."""

    def __init__(self) -> None:
        self.ended = False
        self.exiting = False  # main has returned: said at once, there is no later
        self.late: Optional[signal.Signals] = None
        self.said = False
        self.previous: dict = {}  # the handlers this one replaced, by signal, to put back

    def install(self, signums: Collection[int]) -> None:
        try:
            for signum in signums:
                previous = signal.signal(signum, self)
                self.previous.setdefault(signum, previous)
        except ValueError:  # not the main thread: no handler of ours, the signals keep their meaning
            pass

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def run_ended(self) -> None:
        self.ended = True
        # Not where Ctrl-C is ignored (a job started in the background, nohup): it stays so.
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self.install([signal.SIGINT])

    def __call__(self, signum, frame) -> None:
        if not self.ended:
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)
        if self.late is None:
            self.late = signal.Signals(signum)
            if self.exiting:  # os.write: the main thread may be inside a print to stderr
                self.said = True
                with contextlib.suppress(OSError):
                    os.write(sys.stderr.fileno(), (self.line() + "\n").encode())

    def line(self) -> str:
        return (f"\n{self.late.name} came after the run had ended: nothing was stopped, the command ends with the "
                "run's result")

    def say_late_signal(self) -> None:
        if self.late is not None and not self.said:
            self.said = True
            _say_last(self.line())


# The handler of the main() that is running, for run_result_known.
_running_stops: Optional[_StopSignals] = None


def run_result_known() -> None:
    """For main's `run` to call once its result is known, its manifest written, where its end takes a while yet (a
    Dask cluster's close): a stop signal from then on leaves that result, as one after `run` returned does. It ended
    the run as interrupted (exit 143 for a run whose every output was written), and cut that close short. main's
    handler is installed again: one put in place since (a flow engine's) would raise there. Nothing outside main."""
    stops = _running_stops
    if stops is not None:
        stops.run_ended()
        stops.install(STOP_SIGNALS)


@contextlib.contextmanager
def _stop_signals_end_as_ctrl_c(through_exit: bool = False):
    """Each of STOP_SIGNALS raises Terminated in the main thread (until the run ended: _StopSignals). Prefect's flow
    engine turns a SIGTERM into its own exception, marks the flow run Crashed, then sends the signal again to the
    handler it found: this one, which raises Terminated from there. A SIGHUP reaches this handler directly, and the
    flow run ends as on Ctrl-C. `through_exit`: the process ends next; where the run ended, the handler stays for
    the exit's cleanup."""
    global _running_stops
    stops, outer = _StopSignals(), _running_stops
    stops.install(STOP_SIGNALS)
    _running_stops = stops
    try:
        yield stops
    finally:
        _running_stops = outer
        keep = through_exit and stops.ended
        stops.exiting = keep
        stops.say_late_signal()
        if not keep:
            stops.restore()


def _write_any_character() -> None:
    """stdout and stderr say a character their encoding lacks (PYTHONIOENCODING=ascii, a Latin-1 locale's terminal)
    as a backslash escape: a shard's or key's name in any script otherwise ended a finished run on a traceback."""
    for stream in (sys.stdout, sys.stderr):
        try:
            utf8 = codecs.lookup(stream.encoding).name == "utf-8"
        except (AttributeError, TypeError, LookupError):
            continue
        # surrogateescape writes only the bytes a file name held: in UTF-8 any other character is written too
        if stream.errors == "strict" or (stream.errors == "surrogateescape" and not utf8):
            with contextlib.suppress(AttributeError, ValueError, OSError):
                stream.reconfigure(errors="backslashreplace")


def _say_last(line: str) -> None:
    """`line` on stderr, where there is still somewhere to say it: after a hangup the terminal is gone and writing
    there fails (EIO; a closed pipe: EPIPE), which must not turn the run's end into a traceback and exit 1."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr, flush=True)


class _Progress:
    """A terminal progress bar: shards, failed ones, images, images/s, time elapsed and left (wdsembed.progress)."""

    finished = ended = cached = finished_before = 0
    total: Optional[int] = None  # unknown until the run's shards are planned (or where it stopped before the bar)

    def __enter__(self):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                                   TimeElapsedColumn)
        from rich.text import Text

        class TimeLeft(ProgressColumn):
            """Asked at each redraw, not only as a shard ends: while none ends, the estimate grows with the time
            spent, so a stalled run's keeps climbing."""

            def render(column, task) -> Text:
                left = self.run.seconds_left()
                return Text(f"about {format_duration(left)} left" if left else "")

        self.run = RunProgress(clock=time.perf_counter)  # images, images/s, the time left
        self.finished = 0  # shards whose output is written (this run or before)
        self.ended = 0  # finished or failed
        self.cached = 0  # finished before this run, as their results came back
        self.bar = Progress(
            TextColumn("shards"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[failed]}"),
            TextColumn("{task.fields[images]} images"), TextColumn("{task.fields[rate]} images/s"),
            TimeElapsedColumn(), TimeLeft(),
            # Rich's stdout proxy holds a lock that Dask would then try to pickle with every task.
            redirect_stdout=False, redirect_stderr=False, console=_quiet_once_its_pipe_is_closed(),
        )
        self.bar.__enter__()
        self.task = self.bar.add_task("shards", total=None, images=0, rate="-", failed="")
        return self

    @property
    def started(self) -> float:
        return self.run.started

    @started.setter
    def started(self, value: float) -> None:
        self.run.started = value

    def update(self, result: Optional[dict], done: int, total: int, finished_before: Optional[int] = None) -> None:
        if finished_before is not None:  # the planning's call: the shards found finished, not yet come back
            self.finished_before = finished_before
            self.run.planned(total, finished_before)
        if result:
            self.finished += 1
            self.cached += bool(result.get("cached"))
        if done > self.ended:  # a shard came back (the planning's call reports none)
            self.run.shard_ended(result)
        self.ended, self.total = done, total
        self.run.total = total
        rate = self.run.rate()  # none while nothing was embedded (a run that finds every output finished)
        failed = self.ended - self.finished
        self.bar.update(self.task, completed=done, total=total, images=self.run.images,
                        rate="-" if rate is None else format_rate(rate), failed=f"{failed} failed" if failed else "")

    def so_far(self) -> str:
        """What the run did before it was stopped, for the line that says so; '' before its shards were planned."""
        if self.total is None:
            return ""
        failed = self.ended - self.finished
        # the outputs the planning found finished count before their results come back (as cached ones)
        finished = min(self.finished + max(0, self.finished_before - self.cached), self.total - failed)
        return (f"{finished} of {self.total} shard(s) finished{f', {failed} failed' if failed else ''}, "
                f"{self.total - finished - failed} not (a shard ending as the run stopped may be whole too); ")

    def __exit__(self, *exc):
        try:
            self.bar.__exit__(*exc)
        except OSError:  # its terminal hung up as the bar stopped (EIO): the run's own end is what counts
            pass


def _quiet_once_its_pipe_is_closed():
    """A Rich console on stdout that goes quiet where stdout's pipe is closed (`| head -1`, a log reader gone, a
    hangup). Rich's own ends the process there (SystemExit 1, the status of a failed run) as the progress bar stops
    or the summary prints: a run must end as it went, exit 0 where it ended well, 129 on SIGHUP."""
    from rich.console import Console

    class QuietOnceItsPipeIsClosed(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            with contextlib.suppress(OSError):  # what is still buffered for stdout is flushed nowhere at exit
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)

    return QuietOnceItsPipeIsClosed()


def print_summary(manifest: dict) -> None:
    """The run's summary, one screen at any scale: the table, the failures' causes and the warnings' are listed up to
    report.SUMMARY_ROWS and SUMMARY_CAUSES, then counted; every shard is in the manifest (the full record)."""
    from rich.table import Table
    from rich.text import Text

    console = _quiet_once_its_pipe_is_closed()
    t = manifest["totals"]
    failed = manifest.get("failed_shards") or {}
    causes = report.failure_causes(failed)
    # A failed shard's row gives the number of its cause, where its cause is listed below.
    cause_of = {stem: f" ({n})" for n, cause in enumerate(causes[:report.SUMMARY_CAUSES], 1) for stem in cause.shards}
    written = manifest.get("path")
    everywhere = (f"{one_line(written)} and the flow run's 'shards' table artifact" if written else
                  "the run's log (the manifest was not written)")
    # totals count the finished shards only; the table has a row for each failed one too
    table = Table(title=f"{t['shards'] + len(failed)} shard(s): {t['computed']} computed, {t['cached']} cached"
                  + (f", {len(failed)} failed" if failed else ""))
    for name in ("shard", "rows", "embedded", "failed", "status", "images/s"):
        table.add_column(name, justify="right" if name not in ("shard", "status") else "left")
    shards = report.this_run_shards(manifest)  # not those kept from earlier runs: said in one line below
    stems = sorted({**shards, **failed})
    for stem in stems[:report.SUMMARY_ROWS]:
        s = shards.get(stem)
        if s is None:
            table.add_row(Text(one_line(stem)), "-", "-", "-", f"FAILED{cause_of.get(stem, '')}", "-")
            continue
        rate = s.get("images_per_second")
        # a name as it is: a string cell is rich's markup, where `[x]` or `[bold]a` would lose their brackets; on
        # one line (report.one_line), where a line break would split its row and an escape sequence colour the rest
        table.add_row(Text(one_line(stem)), str(s["rows"]), str(embedded_rows(s)), str(s["failed"]),
                      s.get("status", ""), "-" if rate is None else f"{rate:,.1f}")
    console.print(table)
    # not the table's caption, which rich wraps to the table's width, centred
    console.print("images/s: embedding only (model loading and writing excluded)", soft_wrap=True)
    if len(stems) > report.SUMMARY_ROWS:
        console.print(f"... and {len(stems) - report.SUMMARY_ROWS:,} more shard(s): every one is in {everywhere}",
                      markup=False, highlight=False, soft_wrap=True)
    for n, cause in enumerate(causes[:report.SUMMARY_CAUSES], 1):
        # A reason is not markup: printed as it is, once, with a few of the shards it stopped.
        console.print(f"({n}) {len(cause.shards)} shard(s) failed ({report.name_shards(cause.shards, TERMINAL)}): "
                      f"{cause.words(TERMINAL)}",
                      markup=False, highlight=False, soft_wrap=True)  # whole, so it can be searched and copied
    if len(causes) > report.SUMMARY_CAUSES:
        console.print(f"{report.more_causes(causes)}: every shard's reason is in {everywhere}",
                      markup=False, highlight=False, soft_wrap=True)
    if t["computed"]:
        this_run = f"{t['embedded_this_run']} images this run at {t['images_per_second']} images/s"
    elif failed:  # its only work failed (a shard that fails again): no rate of 0.0 either
        this_run = (f"nothing embedded this run: {len(failed)} shard(s) failed"
                    + ("; every other output was already finished" if t["shards"] else ""))
    else:  # a re-run that found every output finished: a rate of 0.0 would read as a fault
        this_run = "nothing to embed this run: every output was already finished"
    console.print(
        f"model {describe_model(manifest, TERMINAL)} | {t['embedded_rows']} of {t['rows']} rows embedded | {this_run}",
        soft_wrap=True,  # one line, as the terminal wraps it, not cut where rich would
        markup=False,  # the model's name as it is (a local-dir: folder may hold brackets)
    )
    for line in report.describe_rows_without_embedding(manifest, TERMINAL):
        console.print(f"without embedding: {line}", markup=False, highlight=False, soft_wrap=True)
    warned = report.warning_causes(shards)
    for cause in warned[:report.SUMMARY_CAUSES]:
        console.print(f"warning: {report.describe_warning(cause, TERMINAL)}", markup=False, highlight=False,
                      soft_wrap=True)
    if len(warned) > report.SUMMARY_CAUSES:
        console.print(f"warning: {report.more_causes(warned)}: every shard's warnings are in {everywhere}",
                      markup=False, highlight=False, soft_wrap=True)
    for line in (report.describe_earlier_runs(manifest), fidelity.describe(manifest.get("fidelity")),
                 describe_gpu_use(manifest)):
        if line:  # the fidelity line names keys, shards and reasons
            console.print(one_line(line), markup=False, highlight=False, soft_wrap=True)
    # one line however long the paths (a script reads it: README, Exit codes), as the lines above
    console.print(f"output: {one_line(manifest['output'])}  (manifest: {one_line(written or 'not written')})",
                  markup=False, highlight=False, soft_wrap=True)


def _print_manifest_hint(config: EmbedConfig, finished: int, failed: Collection[str] = (),
                         transient: Optional[Collection[str]] = None) -> None:
    """Where the finished work is (said only when some shard finished), and what the same command does again: it
    finishes the rest, and retries the `failed` shards, of which those not `transient` (their failure cannot pass on
    a retry: a file that is not a tar, say) fail again until their cause is fixed. `transient` None: not known."""
    if not failed:
        print(f"{finished} finished shard(s) are in {config.output}; {RESUME}" if finished else
              "no shard finished; run the same command again once the cause is fixed", file=sys.stderr)
        return
    where = f"{finished} finished shard(s) are in {config.output} (not recomputed)" if finished else "no shard finished"
    lasting = sorted(set(failed) - set(transient or ()))
    if transient is None:
        why = "one that failed for its data fails again until its file is replaced"
    elif lasting:
        # No example of a cause: these range from a file that is not a tar to a full disk or another run's claim.
        why = f"{report.name_shards(lasting, TERMINAL)} will fail again until the reason above is fixed"
    else:
        why = "their errors may pass"
    print(f"{where}; run the same command again to retry the {len(failed)} failed shard(s): {why}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
