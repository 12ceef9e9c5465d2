"""Run the SIP user agent with the demo handler: ``python -m telephony.sip --host 127.0.0.1 --port 5070``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from yibao_common.masking import MaskingFilter
from yibao_common.ports import parse_port_range

from .handler import DemoHandler
from .user_agent import UserAgent, UserAgentConfig


def _port_range_arg(text: str) -> tuple[int, int] | None:
    try:
        return parse_port_range(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m telephony.sip", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5060, help="SIP UDP port (default 5060)")
    parser.add_argument("--advertise", default=None, help="address to put in Contact and SDP")
    parser.add_argument("--rtp-ports", default="10000-20000", type=_port_range_arg,
                        help="RTP port range LOW-HIGH, or 'auto'")
    parser.add_argument("--prompt", default=None, help="WAV file played when a call starts")
    parser.add_argument("--echo", action="store_true", help="echo the caller's audio back")
    parser.add_argument("--answer-delay", type=float, default=0.0, help="seconds of ringing before answering")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(MaskingFilter())  # callers' numbers never reach the log
    config = UserAgentConfig(host=args.host, port=args.port, advertised_host=args.advertise,
                             rtp_port_range=args.rtp_ports, answer_delay_s=args.answer_delay)
    asyncio.run(_serve(DemoHandler(args.prompt, echo=args.echo), config))


async def _serve(handler: DemoHandler, config: UserAgentConfig) -> None:
    ua = UserAgent(handler, config)
    await ua.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready: sip:xiaozhi@{config.advertised_host or config.host}:{ua.port}", flush=True)
    await stop.wait()
    await ua.stop()


if __name__ == "__main__":
    main()
