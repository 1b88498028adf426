"""What the slixmpp interop scripts share: one fact per stdout line, a
poll with a deadline, and a main() that turns any failure into an
`ERROR` line and a non-zero exit for the Rust test reading them."""

import asyncio
import logging
import sys

TIMEOUT = 20.0


def out(*parts):
    print(*parts, flush=True)


async def until(what, check, timeout=TIMEOUT):
    """Polls `check` until it is true; fails naming `what` after `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def run(scenario, nargs, doc, budget=6 * TIMEOUT):
    """Runs `scenario(*argv)` (with `-d` for debug logs); prints DONE or
    ERROR and returns the exit status."""
    logging.basicConfig(level=logging.DEBUG if "-d" in sys.argv else logging.WARNING,
                        stream=sys.stderr)
    args = [a for a in sys.argv[1:] if a != "-d"]
    if len(args) != nargs:
        out("ERROR usage:", doc)
        return 2
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(asyncio.wait_for(scenario(*args), budget))
    except asyncio.TimeoutError:
        out("ERROR timeout")
        return 1
    except Exception as e:  # noqa: BLE001 - report anything to the test
        out("ERROR", type(e).__name__, e)
        return 1
    out("DONE")
    return 0
