"""A Tasker worker in Python: claims steps over GraphQL, runs them, reports the outcome.

Run `python worker.py --help`. The protocol is the one in schema.graphql: claimSteps
(long-polled), heartbeatSteps, completeStep / failStep, and releaseSteps on shutdown.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, Optional

from gql import Client, GraphQLRequest, gql
from gql.transport.aiohttp import AIOHTTPTransport
from gql.transport.exceptions import TransportError, TransportQueryError

log = logging.getLogger("tasker.worker")

Lease = Dict[str, Any]
Handler = Callable[[Lease], Awaitable[Dict[str, Any]]]
HANDLERS: Dict[str, Handler] = {}

WAIT_SECONDS = 20  # claimSteps long poll: answers at once when work is ready
MAX_BACKOFF = 30.0  # seconds between retries while the server is unreachable
TRANSIENT_CODES = {"UNAVAILABLE", "RATE_LIMITED", "INTERNAL"}  # worth asking again
# No answer at all (connection refused, 5xx without GraphQL, timeout); asyncio.TimeoutError
# is TimeoutError only from Python 3.11.
UNREACHABLE = (TransportError, TimeoutError, asyncio.TimeoutError, OSError)

CLAIM = gql("""
mutation Claim($workerId: String!, $handlers: [String!], $namespaces: [String!],
               $limit: Int, $leaseSeconds: Int, $waitSeconds: Int) {
  claimSteps(input: {workerId: $workerId, handlers: $handlers, namespaces: $namespaces,
                     limit: $limit, leaseSeconds: $leaseSeconds, waitSeconds: $waitSeconds}) {
    leases { leaseToken stepId taskId name handler config attempt maxAttempts
             namespace template context parentResults }
  }
}""")
HEARTBEAT = gql("""
mutation Heartbeat($tokens: [ID!]!, $leaseSeconds: Int) {
  heartbeatSteps(input: {leaseTokens: $tokens, leaseSeconds: $leaseSeconds}) {
    leases { leaseToken alive }
  }
}""")
COMPLETE = gql("""
mutation Complete($token: ID!, $results: JSON) {
  completeStep(input: {leaseToken: $token, results: $results}) { step { id } }
}""")
FAIL = gql("""
mutation Fail($token: ID!, $message: String!, $retryable: Boolean, $retryAfter: Float) {
  failStep(input: {leaseToken: $token, message: $message, retryable: $retryable,
                   retryAfterSeconds: $retryAfter}) { step { id } }
}""")
RELEASE = gql("""
mutation Release($tokens: [ID!]!) {
  releaseSteps(input: {leaseTokens: $tokens}) { steps { id } }
}""")


class Retryable(Exception):
    """The attempt failed but another may succeed, optionally not before `retry_after` s."""

    def __init__(self, message: str, retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Permanent(Exception):
    """The attempt failed and retrying cannot help: the step fails for good."""


def handler(name: str) -> Callable[[Handler], Handler]:
    """Registers `f` under a handler name; the worker claims only steps it has handlers for."""
    def register(f: Handler) -> Handler:
        HANDLERS[name] = f
        return f
    return register


@handler("python.echo")
async def echo(lease: Lease) -> Dict[str, Any]:
    """Shows what a step receives: the task context and its parents' results."""
    return {"echo": lease["context"], "parents": sorted(lease["parentResults"] or {}),
            "attempt": lease["attempt"]}


@handler("python.flaky")
async def flaky(lease: Lease) -> Dict[str, Any]:
    """Fails retryably until `succeed_on_attempt` (default 2), to show server-side retries."""
    succeed_on = (lease["config"] or {}).get("succeed_on_attempt", 2)
    if lease["attempt"] < succeed_on:
        raise Retryable(f"attempt {lease['attempt']} fails on purpose", retry_after=0.2)
    return {"succeeded_on_attempt": lease["attempt"]}


@handler("python.slow")
async def slow(lease: Lease) -> Dict[str, Any]:
    """Sleeps `seconds` (default 1): longer than a lease, it lives on heartbeats alone."""
    seconds = (lease["config"] or {}).get("seconds", 1)
    await asyncio.sleep(float(seconds))
    return {"slept": seconds}


def error_code(err: BaseException) -> Optional[str]:
    """The `extensions.code` of the first GraphQL error, e.g. LEASE_LOST."""
    errors = getattr(err, "errors", None) or [{}]
    return (errors[0].get("extensions") or {}).get("code")


def error_message(err: BaseException) -> str:
    """The server's message, not the whole error dict gql puts in str(err)."""
    errors = getattr(err, "errors", None) or [{}]
    return errors[0].get("message") or str(err)


def describe(lease: Lease) -> str:
    """The fields every outcome line carries, so logs can be grepped per step or task."""
    return f"step={lease['name']} task={lease['taskId']} attempt={lease['attempt']}"


@dataclass
class Attempt:
    lease: Lease
    task: asyncio.Task[None]
    reporting: bool = False  # once the outcome is being sent, the answer decides its fate


class Worker:
    """One worker: a claim loop and a heartbeat loop around the attempts in flight."""

    def __init__(self, session: Any, args: argparse.Namespace) -> None:
        self.session, self.args = session, args
        self.inflight: Dict[str, Attempt] = {}  # by lease token
        self.slot_freed = asyncio.Event()

    async def call(self, request: GraphQLRequest, variables: Dict[str, Any],
                   retry: bool = True) -> Dict[str, Any]:
        """Runs one mutation; while the server is unreachable (restarting), retries with a
        capped backoff. GraphQL errors other than transient ones are raised to the caller."""
        delay = 0.5
        while True:
            try:
                return await self.session.execute(
                    GraphQLRequest(request, variable_values=variables))
            except TransportQueryError as err:
                if not retry or error_code(err) not in TRANSIENT_CODES:
                    raise
                reason = f"{error_code(err)}: {error_message(err)}"
            except UNREACHABLE as err:
                if not retry:
                    raise
                reason = f"{type(err).__name__}: {err}"
            log.warning("server not answering (%s); retrying in %.1fs", reason, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)

    async def claim_loop(self) -> None:
        """Claims as many steps as there are free slots; the long poll avoids busy-looping."""
        while True:
            while len(self.inflight) >= self.args.concurrency:
                self.slot_freed.clear()
                await self.slot_freed.wait()
            answer = await self.call(CLAIM, {
                "workerId": self.args.worker_id, "handlers": sorted(HANDLERS),
                "namespaces": self.args.namespace or None,
                "limit": self.args.concurrency - len(self.inflight),
                "leaseSeconds": self.args.lease_seconds, "waitSeconds": WAIT_SECONDS})
            for lease in answer["claimSteps"]["leases"]:
                task = asyncio.create_task(self.run(lease))
                self.inflight[lease["leaseToken"]] = Attempt(lease, task)
                task.add_done_callback(lambda _, token=lease["leaseToken"]: self.forget(token))

    def forget(self, token: str) -> None:
        """Frees the slot of a finished (or cancelled) attempt."""
        self.inflight.pop(token, None)
        self.slot_freed.set()

    async def run(self, lease: Lease) -> None:
        """Runs one attempt and reports it. Cancellation (lost lease, shutdown) reports nothing."""
        try:
            results = await HANDLERS[lease["handler"]](lease)
            if not isinstance(results, dict):
                raise TypeError(f"handler returned {type(results).__name__}, not a dict")
            json.dumps(results)  # unserializable results fail the attempt, not the worker
        except asyncio.CancelledError:
            raise
        except Retryable as err:
            await self.report(lease, "failed", FAIL, message=str(err), retryable=True,
                              retryAfter=err.retry_after)
        except Permanent as err:
            await self.report(lease, "failed", FAIL, message=str(err), retryable=False)
        except Exception as err:  # a bug in a handler: another attempt may still help
            log.debug("handler raised", exc_info=True)
            await self.report(lease, "failed", FAIL, message=f"{type(err).__name__}: {err}",
                              retryable=True)
        else:
            await self.report(lease, "completed", COMPLETE, results=results)

    async def report(self, lease: Lease, outcome: str, request: GraphQLRequest,
                     **variables: Any) -> None:
        """Sends completeStep/failStep, retried while the server is away; a refusal such as
        LEASE_LOST is logged and dropped: the step is no longer ours."""
        attempt = self.inflight.get(lease["leaseToken"])
        if attempt:
            attempt.reporting = True
        try:
            await self.call(request, {"token": lease["leaseToken"], **variables})
        except TransportQueryError as err:
            log.warning("dropped %s code=%s error=%s", describe(lease), error_code(err),
                        error_message(err))
            return
        extra = ""
        if outcome == "failed":
            extra = f" retryable={str(variables['retryable']).lower()} error={variables['message']}"
        log.info("%s %s%s", outcome, describe(lease), extra)

    async def heartbeat_loop(self) -> None:
        """Extends every in-flight lease in one call; a lost lease stops its handler."""
        while True:
            await asyncio.sleep(self.args.lease_seconds / 3)
            tokens = list(self.inflight)
            if not tokens:
                continue
            try:
                answer = await self.call(HEARTBEAT, {
                    "tokens": tokens, "leaseSeconds": self.args.lease_seconds}, retry=False)
            except UNREACHABLE as err:  # GraphQL errors too: the next beat may pass
                log.warning("heartbeat failed (%s); trying again next beat", error_message(err))
                continue
            for status in answer["heartbeatSteps"]["leases"]:
                attempt = self.inflight.get(status["leaseToken"])
                if not status["alive"] and attempt and not attempt.reporting:
                    log.warning("lost %s (lease expired; its result would be refused)",
                                describe(attempt.lease))
                    attempt.task.cancel()

    async def drain(self) -> None:
        """Lets attempts finish within the grace period, then cancels the rest and gives
        their leases back so another worker can claim them at once (the attempt is undone)."""
        if self.inflight:
            log.info("stopping: waiting up to %ss for %d attempt(s)",
                     self.args.grace_seconds, len(self.inflight))
            await asyncio.wait([a.task for a in self.inflight.values()],
                               timeout=self.args.grace_seconds)
        left = [a for a in self.inflight.values() if not a.task.done()]
        if not left:
            return
        for attempt in left:
            attempt.task.cancel()
        await asyncio.gather(*(a.task for a in left), return_exceptions=True)
        try:
            answer = await asyncio.wait_for(self.call(
                RELEASE, {"tokens": [a.lease["leaseToken"] for a in left]}, retry=False), 10)
        except UNREACHABLE as err:
            log.error("could not release %d lease(s) (%s); they expire in %ss",
                      len(left), error_message(err), self.args.lease_seconds)
            return
        released = {step["id"] for step in answer["releaseSteps"]["steps"]}
        for attempt in left:
            if attempt.lease["stepId"] in released:
                log.info("released %s", describe(attempt.lease))
            else:
                log.warning("not released %s (lease no longer held)", describe(attempt.lease))


async def main(args: argparse.Namespace) -> int:
    """Works until SIGTERM/SIGINT (exit 0) or a refusal no retry can fix (exit 1)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    token = (Path(args.token_file).read_text().strip() if args.token_file
             else os.environ.get("TASKER_TOKEN"))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = AIOHTTPTransport(url=args.server.rstrip("/") + "/graphql", headers=headers)
    # execute_timeout (10 s by default) must outlast the long poll.
    async with Client(transport=transport, execute_timeout=WAIT_SECONDS + 30) as session:
        worker = Worker(session, args)
        log.info("started worker=%s server=%s handlers=%s concurrency=%d", args.worker_id,
                 args.server, ",".join(sorted(HANDLERS)), args.concurrency)
        claimer = asyncio.create_task(worker.claim_loop())
        beater = asyncio.create_task(worker.heartbeat_loop())
        stop = asyncio.create_task(stopping.wait())
        await asyncio.wait([claimer, stop], return_when=asyncio.FIRST_COMPLETED)
        status = 0
        if claimer.done():  # claiming was refused: UNAUTHENTICATED, FORBIDDEN, ...
            err = claimer.exception()
            log.error("cannot claim (code=%s): %s", error_code(err), error_message(err))
            status = 1
        else:
            log.info("stopping worker=%s: no more claims", args.worker_id)
        claimer.cancel()  # stops claiming at once, long poll included
        stop.cancel()
        await worker.drain()
        beater.cancel()
    log.info("stopped worker=%s", args.worker_id)
    return status


def bounded(low: int, high: int) -> Callable[[str], int]:
    """An argparse type for an integer the server accepts."""
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}")
        return value
    return parse


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", default=os.environ.get("TASKER_SERVER", "http://127.0.0.1:8080"))
    p.add_argument("--token-file", help="file holding the bearer token (else $TASKER_TOKEN)")
    p.add_argument("--worker-id", default=f"python-{socket.gethostname()}-{os.getpid()}")
    p.add_argument("--concurrency", type=bounded(1, 100), default=4)
    p.add_argument("--namespace", action="append", help="only these namespaces (repeatable)")
    p.add_argument("--lease-seconds", type=bounded(1, 3600), default=30)
    p.add_argument("--grace-seconds", type=float, default=10.0)
    return p.parse_args()


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    sys.exit(asyncio.run(main(parse_args())))
