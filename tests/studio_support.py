"""The app for the browser tests: uvicorn on 127.0.0.1 with the real engine (the embedded tiny
default), a SQLite store and a job worker the test can pause (so a job stays queued exactly as
long as a test needs: no timing races on a slow machine)."""
from __future__ import annotations

import io
import tempfile
import threading
import time
from pathlib import Path

from helpers import free_port


class PausableWorker:
    """Runs `JobWorker.run_once()` in a thread while `running` is set."""

    def __init__(self, worker) -> None:
        self.worker = worker
        self.running = threading.Event()
        self.running.set()
        self._stop = threading.Event()
        self._busy = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="studio-test-worker", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.running.wait(0.2):
                continue
            with self._busy:
                claimed = self.running.is_set() and self.worker.run_once().claimed
            if not claimed:
                self._stop.wait(0.1)  # idle poll of the queue

    def pause(self) -> None:
        """Stop claiming; returns once any batch in progress has finished."""
        self.running.clear()
        with self._busy:
            pass

    def close(self) -> None:
        self._stop.set()
        self.running.set()
        self.thread.join(60)


class StudioServer:
    def __init__(self) -> None:
        import uvicorn

        from avatar_engine import AvatarEngine, EngineConfig
        from serve.app import create_app, event_renderer
        from serve.assets import AssetStore
        from serve.engine_client import LocalEngineClient
        from serve.policy import PolicyChecker
        from serve.settings import ServiceSettings
        from serve.store import open_store
        from serve.worker import JobWorker

        self.tmp = Path(tempfile.mkdtemp(prefix="ae-studio-"))
        self.settings = ServiceSettings.from_dict({
            "data_dir": str(self.tmp), "tiers": {"free": [1000, 2], "pro": [1000, 8]},
            "progress_interval_s": 0.0, "wait_poll_max_s": 0.25}, env=False)
        self.store = open_store(self.settings.resolved_db_url, event_renderer=event_renderer())
        self.engine = AvatarEngine(EngineConfig(device="cpu"))
        assets = AssetStore.from_url(self.settings.resolved_assets_url)
        worker = JobWorker(self.store, self.engine, assets, self.settings,
                           policy=PolicyChecker(self.settings.all_policy_words()))
        app = create_app(self.settings, self.store, LocalEngineClient(self.engine, worker), assets=assets)
        self.worker = PausableWorker(worker)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def account(self, tier: str = "pro", credits: int = 1000) -> tuple[str, str]:
        """(account id, API key) of a new account."""
        acct = self.store.create_account(tier, credits)
        _, key = self.store.create_api_key(acct.id)
        return acct.id, key

    def close(self) -> None:
        self.worker.close()
        self.server.should_exit = True
        self.thread.join(10)
        self.store.close()


def astronaut_jpeg(path: Path, box: tuple[int, int, int, int] = (0, 0, 512, 512)) -> Path:
    """scikit-image's bundled astronaut photo (a real face) as a JPEG file to upload."""
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).crop(box).save(buf, format="JPEG", quality=90)
    path.write_bytes(buf.getvalue())
    return path


def png_data_url(color: tuple[int, int, int] = (40, 160, 90), size: int = 32) -> str:
    import base64

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
