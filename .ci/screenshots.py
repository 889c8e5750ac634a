#!/usr/bin/env python3
"""The README's pictures of the page: docs/recent-deliveries.png (1280 pixels wide) and
docs/recent-deliveries-phone.png (390), with jobs in every state and a redelivered one open.

    python .ci/screenshots.py

It starts webhookd on a throwaway database, with an operator key and a client, and a loopback
receiver that answers each path its own way; Chromium (/usr/bin/chromium) takes the pictures.
Not part of the test suite.
"""
from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
from aiohttp import web
from playwright.async_api import async_playwright

HERE = Path(__file__).resolve().parent.parent
KEY = "an-operator-key-for-the-screenshots"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ANSWERS = {"/orders": [200], "/flaky": [500, 200], "/billing": [503], "/gone": [410]}  # the last one repeats


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def receiver(port: int) -> web.AppRunner:
    seen: dict[str, int] = {}

    async def answer(request: web.Request) -> web.Response:
        codes = ANSWERS.get(request.path, [404])
        seen[request.path] = seen.get(request.path, 0) + 1
        return web.json_response({}, status=codes[min(seen[request.path], len(codes)) - 1])

    app = web.Application()
    app.router.add_post("/{path:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def jobs(http: aiohttp.ClientSession, url: str, hooks_port: int) -> str:
    """Jobs in every state, for two receivers and a client; the id of the one the pictures open."""
    operator = {"Authorization": f"Bearer {KEY}"}
    made = await (await http.post(f"{url}/clients", json={"name": "acme"}, headers=operator)).json()
    acme = {"Authorization": f"Bearer {made['api_key']['key']}"}
    here, there = f"http://127.0.0.1:{hooks_port}", f"http://localhost:{hooks_port}"

    async def submit(text: str, webhook_url: str | None, headers: dict[str, str] = operator, **fields: object) -> str:
        body = {"text": text, **({"webhook_url": webhook_url} if webhook_url else {}), **fields}
        return (await (await http.post(f"{url}/predict", json=body, headers=headers)).json())["job_id"]

    async def attempts(job_id: str, count: int) -> None:
        while len((await (await http.get(f"{url}/webhooks/{job_id}/status", headers=operator)).json())["attempts"]) < count:
            await asyncio.sleep(0.1)

    await submit("Nothing to tell anyone", None)
    await submit("The parcel came a day early", here + "/gone")
    flaky = await submit("Great support, thank you!", here + "/flaky", retry_policy={"backoff_base": 0.5})
    await submit("Invoice 1043 is wrong again", there + "/billing", retry_policy={"backoff_base": 900})
    await submit("Love the new dashboard", here + "/orders", acme)
    await submit("Order 7 arrived", there + "/orders")
    await attempts(flaky, 2)
    await asyncio.sleep(3)  # so that the redelivery stands apart from the retry in the timeline
    await http.post(f"{url}/webhooks/{flaky}/redeliver", headers=operator)
    await attempts(flaky, 3)
    return flaky


async def main() -> None:
    hooks_port, port = free_port(), free_port()
    hooks = await receiver(hooks_port)
    with tempfile.TemporaryDirectory() as home:
        service = subprocess.Popen(
            [sys.executable, str(HERE / "webhookd.py"), "--port", str(port), "--db", f"{home}/w.db", "--secret", SECRET,
             "--api-key", KEY, "--allow-private-urls", "--log-level", "error"], cwd=home)
        url = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(100):
                    try:
                        await http.get(url + "/healthz")
                        break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.1)
                shown = await jobs(http, url, hooks_port)
            async with async_playwright() as playwright:
                # As in the tests: flags that keep Chromium off the network it would otherwise call home on.
                browser = await playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
                    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync"])
                # The whole page at 1280 pixels; at 390, what a phone shows first.
                for name, width, height, whole in (("recent-deliveries", 1280, 860, True),
                                                   ("recent-deliveries-phone", 390, 844, False)):
                    page = await browser.new_page(viewport={"width": width, "height": height})
                    await page.add_init_script(f"sessionStorage.setItem('webhookd-key', {KEY!r})")
                    await page.goto(url)
                    await page.get_by_role("button", name="Show " + shown).click()
                    await page.locator("#detail ol > li").nth(2).wait_for()
                    await page.evaluate("window.scrollTo(0, 0)")
                    await page.screenshot(path=str(HERE / "docs" / f"{name}.png"), full_page=whole)
                await browser.close()
        finally:
            service.terminate()
            service.wait()
            await hooks.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
