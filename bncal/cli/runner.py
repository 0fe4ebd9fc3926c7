"""How every command runs: outputs planned before the work and written after it, errors in one line.

:func:`run_command` runs a command body under the rules of :mod:`bncal.cli`: exit 0 on success;
1 for a user-facing error (one line, ``error: ...``, the traceback with ``-v``) or a failed
verification or check; 143 on SIGTERM, 129 on SIGHUP; nothing written unless the body succeeds.
"""

from __future__ import annotations

import sys
import traceback

import click

from ..errors import BncalError, first_line

__all__ = ["run_command", "describe_error"]


def run_command(body, args, groups) -> None:
    """Run a command body: plan and check its outputs, run it, write its outputs, word its errors."""
    from ..distributed import environment
    from ..outputs import OutputPlan, Terminated, terminate_on_sigterm

    ui = args.ui
    try:
        launch = environment()
        prefix = f"rank {launch.rank}: " if launch.distributed else ""
        writes = launch.is_main
    except BncalError:
        prefix, writes = "", True
    status = 0
    try:
        with terminate_on_sigterm():
            plan = OutputPlan(force=args.output.force, hold_staging=writes)  # only rank 0 writes
            for group in groups:
                group.plan(getattr(args, group.name), plan, args)
            plan.check()
            args.plan = plan
            with plan:
                status = body(args) or 0
        ui.committed()
        ui.finished()
    except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
        raise
    except Terminated as exc:
        ui.error(f"{prefix}terminated ({exc.signal_name}); nothing was written")
        sys.exit(128 + exc.signum)
    except KeyboardInterrupt:
        ui.error(f"{prefix}interrupted; nothing was written")
        sys.exit(1)
    except SystemExit as exc:  # the user's code (a factory, a data function) called sys.exit
        ui.error(f"{prefix}{_exit_origin(exc)} called sys.exit({exc.code}); nothing was written: that code should "
                 "return its result, or raise an exception to report a problem")
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line
        if ui.verbose:
            traceback.print_exc()
        ui.error(prefix + describe_error(exc, verbose=ui.verbose))
        sys.exit(1)
    if status:
        sys.exit(status)


def _exit_origin(exc: SystemExit) -> str:
    """Where ``sys.exit`` was called: ``file.py:LINE (function)`` of the innermost frame."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "code run by this command"
    code = tb.tb_frame.f_code
    return f"{code.co_filename}:{tb.tb_lineno} ({code.co_name})"


def describe_error(exc: BaseException, *, verbose: bool = False) -> str:
    """One line for an error: a BncalError's own message; for anything else what failed and why."""
    from ..extras import missing_extra

    hint = "" if verbose else " (run with -v for the traceback)"
    missing = missing_extra(exc)  # an optional dependency, wherever its import failed
    if missing is not None:
        return str(missing)
    if isinstance(exc, BncalError):
        # Where the message wraps another error (the user's code failing, say), -v shows where it came from.
        cause = exc.__cause__
        wraps_code = cause is not None and not isinstance(cause, (BncalError, OSError))
        return str(exc) + (hint if wraps_code and "-v" not in str(exc) else "")
    from ..distributed import peer_failure
    from ..outputs import os_error_text

    peer = peer_failure(exc)
    if peer is not None:
        return peer
    if type(exc).__module__.startswith("onnxruntime"):
        from ..onnx.runtime import describe_ort_error

        return describe_ort_error(exc) + hint
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {os_error_text(exc)}{hint}"
    return f"{type(exc).__name__}: {first_line(exc)}{hint}"
