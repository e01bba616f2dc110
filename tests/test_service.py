"""The publisher's fine-tuning service, through its HTTP API on the tiny pipeline: upload, job,
progress, a verified download, tenants kept apart, and bad input refused with a 4xx."""
import io
import json
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from freezeasguard.cli import main
from freezeasguard.guard.mask import Mask
from freezeasguard.models.pipelines import load_denoiser_state
from freezeasguard.service.api import create_app
from freezeasguard.service.settings import ServiceConfig
from freezeasguard.service.store import Store


def zip_folder(folder, extra: dict | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted(folder.iterdir()):
            z.write(p, f"data/{p.name}")
        for name, content in (extra or {}).items():
            z.writestr(name, content)
    return buf.getvalue()


@pytest.fixture()
def service(tiny_sd, tmp_path):
    mask = Mask.random(list(load_denoiser_state(tiny_sd).items()), 0.3, seed=5).save(tmp_path / "mask.safetensors")
    settings = ServiceConfig(root=str(tmp_path / "svc"), model=str(tiny_sd), mask=str(mask), checkpoint_every=2,
                               max_steps=50, max_active_jobs=2)
    store = Store(tmp_path / "svc" / "service.db")
    keys = {name: store.add_tenant(name) for name in ("alice", "bob")}
    with TestClient(create_app(settings)) as client:
        yield client, keys, tmp_path, mask


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def wait(client, key, job_id, timeout=180):
    end = time.time() + timeout
    while time.time() < end:
        job = client.get(f"/jobs/{job_id}", headers=auth(key)).json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not end: {job}")


def upload(client, key, data: bytes, name="data.zip"):
    return client.post("/datasets", headers=auth(key), files={"file": (name, data, "application/octet-stream")})


@pytest.mark.slow
def test_upload_job_progress_and_a_verified_download_that_verify_passes(service, people, tmp_path, capsys):
    client, keys, _, mask = service
    ds = upload(client, keys["alice"], zip_folder(people))
    assert ds.status_code == 201, ds.text
    assert ds.json()["images"] == 8
    job = client.post("/jobs", headers=auth(keys["alice"]),
                      json={"dataset": ds.json()["id"], "steps": 4, "batch_size": 2, "lr": 1e-3}).json()
    events = []
    with client.stream("GET", f"/jobs/{job['id']}/events", headers=auth(keys["alice"])) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["state"] == "done" and events[-1]["progress"] == 1.0
    assert len(events[-1]["recent_losses"]) == 4 and events[-1]["verify"]["compliant"]
    # what the page's job table shows: kind, mask, verdict and the links of a finished job
    assert events[-1]["kind"] == "full" and events[-1]["mask"].startswith("mask.safetensors (")
    assert events[-1]["verdict"] == "compliant" and events[-1]["links"]["result"] == f"/jobs/{job['id']}/result"
    assert events[0]["verdict"] is None and events[0]["links"] == {}
    got = client.get(f"/jobs/{job['id']}/result", headers=auth(keys["alice"]))
    assert got.status_code == 200
    out = tmp_path / "downloaded"
    zipfile.ZipFile(io.BytesIO(got.content)).extractall(out)
    assert json.loads((out / "verify_report.json").read_text())["compliant"]
    capsys.readouterr()
    assert main(["verify", "--model", str(client.app.state.settings.model), "--mask", str(mask),
                 "--candidate", str(out)]) == 0
    png = client.get(f"/jobs/{job['id']}/samples", params={"prompt": "a photo of mara quell"}, headers=auth(keys["alice"]))
    from PIL import Image
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (4 * 16, 16)
    assert "<progress" in client.get("/").text


def test_loose_images_and_their_captions_are_a_dataset_too(service, people):
    client, keys, *_ = service
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(people.iterdir())]
    r = client.post("/datasets", headers=auth(keys["alice"]), files=files)
    assert r.status_code == 201 and r.json()["images"] == 8, r.text
    sneaky = [("files", ("../metadata.jsonl", b'{"file_name": "a.png", "text": "x"}', "text/plain"))]
    r = client.post("/datasets", headers=auth(keys["alice"]), files=sneaky)
    assert r.status_code == 400 and "plain names only" in r.json()["detail"]


def test_a_lora_job_releases_an_adapter_that_touches_no_frozen_module(service, people):
    client, keys, *_ = service
    ds = upload(client, keys["alice"], zip_folder(people)).json()
    job = client.post("/jobs", headers=auth(keys["alice"]),
                      json={"dataset": ds["id"], "steps": 2, "batch_size": 2, "lora_rank": 2}).json()
    done = wait(client, keys["alice"], job["id"])
    assert done["state"] == "done" and done["verify"]["kind"] == "lora" and done["verify"]["compliant"]
    names = zipfile.ZipFile(io.BytesIO(client.get(f"/jobs/{job['id']}/result", headers=auth(keys["alice"])).content)).namelist()
    assert "pytorch_lora_weights.safetensors" in names


def test_tenants_are_kept_apart_and_keys_are_required(service, people):
    client, keys, tmp_path, _ = service
    ds = upload(client, keys["alice"], zip_folder(people)).json()
    job = client.post("/jobs", headers=auth(keys["alice"]), json={"dataset": ds["id"], "steps": 1, "batch_size": 2}).json()
    for path in (f"/datasets/{ds['id']}", f"/jobs/{job['id']}", f"/jobs/{job['id']}/result"):
        assert client.get(path, headers=auth(keys["bob"])).status_code == 404
    assert client.post("/jobs", headers=auth(keys["bob"]), json={"dataset": ds["id"], "steps": 1}).status_code == 404
    assert client.post(f"/jobs/{job['id']}/cancel", headers=auth(keys["bob"])).status_code == 404
    assert client.get("/jobs", headers=auth(keys["bob"])).json() == []
    assert client.get("/jobs").status_code == 401 and client.get("/jobs", headers=auth("fag_guess")).status_code == 401
    key_hashes = (tmp_path / "svc" / "service.db").read_bytes()
    assert keys["alice"].encode() not in key_hashes                    # only hashes are stored
    wait(client, keys["alice"], job["id"])


def _tar_with_link() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("data/metadata.jsonl")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(info)
    return buf.getvalue()


def huge_png_header(width=20_000, height=20_000) -> bytes:
    """A real 1 x 1 PNG whose header says width x height (CRC fixed): what a decoder would be asked
    to allocate 400 M pixels for."""
    import struct
    import zlib

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_bad_uploads_are_refused_with_a_reason_and_pickles_are_never_loaded(service, people, tmp_path):
    client, keys, *_ = service
    alice = keys["alice"]
    marker = tmp_path / "PICKLE_RAN"
    import pickle

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    cases = {
        "dotdot": (zip_folder(people, {"../evil.txt": "x"}), 400, "'..'"),
        "link": (_tar_with_link(), 400, "link"),
        "bomb": (zip_folder(people, {"data/zeros.bin": b"\0" * (3 * 2**20)}), 413, "unpacks to more than"),
        "not-an-image": (zip_folder(people, {"data/0000.png": b"this is not a png"}), 400, "0000.png"),
        "missing-file": (zip_folder(people, {"data/metadata.jsonl": '{"file_name": "nope.png", "text": "x"}\n'}),
                         400, "nope.png"),
        "no-metadata": (zip_folder(tmp_path / "empty") if (tmp_path / "empty").mkdir() is None else b"", 400,
                        "metadata"),
        "not-an-archive": (b"hello", 400, "neither a zip nor a tar"),
        "20000x20000": (zip_folder(people, {"data/0001.png": huge_png_header()}), 413, "too large to open"),
    }
    client.app.state.settings.max_unpacked_mb = 2
    for name, (data, status, words) in cases.items():
        r = upload(client, alice, data)
        assert r.status_code == status, (name, r.text)
        assert words in r.json()["detail"], (name, r.json())
    client.app.state.settings.max_unpacked_mb = 1000
    ok = upload(client, alice, zip_folder(people, {"data/model.ckpt": pickle.dumps(Evil()),
                                                   "data/weights.pkl": pickle.dumps(Evil())}))
    assert ok.status_code == 201 and not marker.exists()              # ignored, never unpickled
    client.app.state.settings.max_image_pixels = 100                  # 16 x 16 images are over it
    assert upload(client, alice, zip_folder(people)).status_code == 413
    client.app.state.settings.max_image_pixels, client.app.state.settings.max_upload_mb = 4096 * 4096, 0.001
    assert upload(client, alice, zip_folder(people)).status_code == 413
    assert not any((tmp_path / "svc" / "datasets").glob("*/*/*.txt"))   # refused uploads leave nothing


@pytest.mark.slow      # end to end: two fine-tuning jobs through the service (.ci/run runs -m slow)
def test_limits_quotas_and_a_tampered_result(service, people):
    client, keys, *_ = service
    alice = keys["alice"]
    ds = upload(client, alice, zip_folder(people)).json()
    over = client.post("/jobs", headers=auth(alice), json={"dataset": ds["id"], "steps": 51, "batch_size": 2})
    assert over.status_code == 422 and "steps 51 > 50" in over.json()["detail"]
    a = client.post("/jobs", headers=auth(alice), json={"dataset": ds["id"], "steps": 2, "batch_size": 2}).json()
    client.post("/jobs", headers=auth(alice), json={"dataset": ds["id"], "steps": 2, "batch_size": 2})
    assert client.post("/jobs", headers=auth(alice), json={"dataset": ds["id"], "steps": 1}).status_code == 429
    done = wait(client, alice, a["id"])
    assert client.get(f"/jobs/{a['id']}/result", headers=auth(alice)).status_code == 200
    weights = next(p for p in (client.app.state.store.job(a["id"])["result"]["hashes"]) if p.endswith(".safetensors"))
    path = client.app.state.settings.root + f"/jobs/{a['id']}/out/{weights}"
    with open(path, "r+b") as f:                                         # one byte changed on disk
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    tampered = client.get(f"/jobs/{a['id']}/result", headers=auth(alice))
    assert done["state"] == "done" and tampered.status_code == 409 and "changed on disk" in tampered.json()["detail"]


@pytest.mark.slow
def test_a_worker_killed_mid_job_resumes_after_restart_and_gives_the_uninterrupted_result(tiny_sd, people, tmp_path):
    """kill -9 of `freezeasguard serve` mid-job, then a restart: the job resumes from its last
    checkpoint and its weights equal those of the same job run without interruption."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    import httpx
    import torch

    mask = Mask.random(list(load_denoiser_state(tiny_sd).items()), 0.3, seed=5).save(tmp_path / "mask.safetensors")
    root = tmp_path / "svc"
    key = Store(root / "service.db").add_tenant("alice")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "freezeasguard.cli", "serve", "--root", str(root), "--model", str(tiny_sd),
           "--mask", str(mask), "--port", str(port), "--checkpoint-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = f"http://127.0.0.1:{port}"

    def start():
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(300):
            try:
                httpx.get(base + "/docs", timeout=1)
                return proc
            except httpx.TransportError:
                time.sleep(0.2)
        proc.kill()
        raise AssertionError("the server did not start")

    def job_state(job_id):
        return httpx.get(f"{base}/jobs/{job_id}", headers=auth(key)).json()

    server = start()
    try:
        ds = httpx.post(base + "/datasets", headers=auth(key), files={"file": ("d.zip", zip_folder(people))}).json()
        request = {"dataset": ds["id"], "steps": 60, "batch_size": 2, "lr": 1e-3, "seed": 3}
        killed = httpx.post(base + "/jobs", headers=auth(key), json=request).json()["id"]
        while job_state(killed)["step"] < 10:
            time.sleep(0.05)
        os.kill(server.pid, signal.SIGKILL)                 # no clean-up of any kind
        server.wait()
        assert Store(root / "service.db").job(killed)["state"] == "running"
        server = start()                                     # requeues it; it resumes from its checkpoint
        again = httpx.post(base + "/jobs", headers=auth(key), json=request).json()["id"]
        for job_id in (killed, again):
            while job_state(job_id)["state"] not in ("done", "failed"):
                time.sleep(0.2)
            assert job_state(job_id)["state"] == "done", job_state(job_id)
    finally:
        server.kill()
    a = load_denoiser_state(root / "jobs" / killed / "out")
    b = load_denoiser_state(root / "jobs" / again / "out")
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow
def test_the_web_page_uploads_and_shows_a_progress_bar_in_headless_chromium(tiny_sd, people, tmp_path):
    """Debian's chromium and chromium-driver (installed by .ci/run), driven by selenium: key, upload,
    pick the dataset from the list, start a job, watch its progress bar reach the end with its
    verdict and the download button, download the result, then audit a tampered file and a
    compliant one in the audit box, sort the report by verdict and fetch its CSV.
    FREEZEASGUARD_SCREENSHOTS=DIR saves the page at each step (docs/service.md's pictures)."""
    import os
    import shutil
    import threading

    from safetensors.torch import save_file

    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert browser and driver_path, "install Debian's chromium and chromium-driver (apt-get install -y ...)"
    mask = Mask.random(list(load_denoiser_state(tiny_sd).items()), 0.3, seed=5).save(tmp_path / "mask.safetensors")
    settings = ServiceConfig(root=str(tmp_path / "svc"), model=str(tiny_sd), mask=str(mask), checkpoint_every=2)
    key = Store(tmp_path / "svc" / "service.db").add_tenant("alice")
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    archive = tmp_path / "data.zip"
    archive.write_bytes(zip_folder(people))
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1100,900")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    pictures = os.environ.get("FREEZEASGUARD_SCREENSHOTS")

    def shoot(name):
        if pictures:
            Path(pictures).mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(Path(pictures) / f"service-{name}.png"))
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        driver.find_element(By.ID, "key").send_keys(key)
        driver.find_element(By.ID, "save-key").click()
        driver.find_element(By.ID, "file").send_keys(str(archive))
        driver.find_element(By.ID, "upload").click()
        WebDriverWait(driver, 30).until(lambda d: "8 images" in d.find_element(By.ID, "upload-status").text)
        # the dataset is picked from the list (with its size), not pasted
        options = WebDriverWait(driver, 10).until(
            lambda d: d.execute_script("return [...document.querySelectorAll('#dataset option')].map(o => [o.value, o.text])"
                                       ) or False)
        assert len(options) == 1 and options[0][0].startswith("ds_") and "8 images" in options[0][1]
        assert driver.execute_script("return document.getElementById('dataset').value") == options[0][0]
        shoot("1-dataset")
        steps = driver.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("6")
        driver.find_element(By.ID, "batch").clear()
        driver.find_element(By.ID, "batch").send_keys("2")
        driver.find_element(By.ID, "start").click()
        seen = set()
        # the page redraws the table every second, so state is read in one script call (no stale elements)
        read = "const p = document.querySelector('#jobs progress'), s = document.querySelector('#jobs .state');" \
               "return p ? [p.value, s.textContent, !!document.querySelector('#jobs button')] : null;"

        def finished(d):
            row = d.execute_script(read)
            if row:
                seen.add(row[0])
            return row if row and row[2] else False
        value, state, _ = WebDriverWait(driver, 120, poll_frequency=0.1).until(finished)
        assert value == 1 and "done" in state
        assert len(seen) >= 2                  # the bar moved: a value before the end, and the end
        cells = driver.execute_script("return [...document.querySelectorAll('#jobs tr td')].map(c => c.textContent)")
        assert cells[1] == "full" and cells[2].startswith("mask.safetensors (") and cells[6] == "compliant"
        shoot("2-job-done")
        # the download button's request, made as the page makes it: a zip with the verify report
        fetched = driver.execute_async_script(
            "const done = arguments[arguments.length - 1], id = document.querySelector('#jobs tr').dataset.job;"
            "fetch(`/jobs/${id}/result`, {headers: headers()}).then(async r => done([r.status, "
            "(await r.arrayBuffer()).byteLength, r.headers.get('content-type')]));")
        assert fetched[0] == 200 and fetched[1] > 10_000 and fetched[2] == "application/zip"
        # the audit box: a tampered checkpoint and a compliant one
        base = load_denoiser_state(tiny_sd)
        victim = Mask.load(mask).frozen_names[0]
        save_file({**base, victim: base[victim] + 0.5}, str(tmp_path / "tampered.safetensors"))
        save_file(base, str(tmp_path / "untouched.safetensors"))
        driver.find_element(By.ID, "audit-files").send_keys(
            "\n".join(str(tmp_path / n) for n in ("untouched.safetensors", "tampered.safetensors")))
        driver.find_element(By.ID, "audit").click()
        read_audit = "return [...document.querySelectorAll('#audit-rows tr')].map(r => [...r.children].map(c => c.textContent))"
        rows = WebDriverWait(driver, 60).until(lambda d: (len(d.execute_script(read_audit)) == 2 and
                                                          d.execute_script(read_audit)))
        assert [r[2] for r in rows] == ["violations", "compliant"]        # worst first
        assert rows[0][0] == "tampered.safetensors" and rows[0][5].startswith(victim)
        assert "1 compliant, 1 with violations" in driver.find_element(By.ID, "audit-status").text
        driver.find_element(By.CSS_SELECTOR, "#audit-table th[data-key='verdict']").click()
        assert [r[2] for r in driver.execute_script(read_audit)] == ["compliant", "violations"]
        driver.execute_script("document.getElementById('audit-table').scrollIntoView(false)")
        shoot("3-audit")
        csv_text = driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(document.getElementById('audit-csv').dataset.url, {headers: headers()}).then(r => r.text()).then(done);")
        assert csv_text.splitlines()[0].startswith("file,format,verdict") and "tampered.safetensors" in csv_text
        # a bad upload is a clear error on the page
        (tmp_path / "model.ckpt").write_bytes(b"not a safetensors file")
        driver.find_element(By.ID, "audit-files").clear()
        driver.find_element(By.ID, "audit-files").send_keys(str(tmp_path / "model.ckpt"))
        driver.find_element(By.ID, "audit").click()
        WebDriverWait(driver, 30).until(
            lambda d: "model.ckpt: not a .safetensors or .gguf file" in d.find_element(By.ID, "audit-status").text)
    finally:
        driver.quit()
        server.should_exit = True
        thread.join(10)


@pytest.mark.slow
def test_with_a_redis_queue_a_worker_in_another_process_runs_the_job(tiny_sd, people, tmp_path):
    """serve --queue redis://...: the job goes to Redis (a real redis-server on loopback, Debian's
    package) and `freezeasguard worker --burst`, another process, runs it; the API sees it done."""
    import os
    import shutil
    import socket
    import subprocess
    import sys

    redis_server = shutil.which("redis-server")
    assert redis_server, "install Debian's redis-server (apt-get install -y redis-server)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    redis = subprocess.Popen([redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        for _ in range(100):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        mask = Mask.random(list(load_denoiser_state(tiny_sd).items()), 0.3, seed=5).save(tmp_path / "mask.safetensors")
        root = tmp_path / "svc"
        settings = ServiceConfig(root=str(root), model=str(tiny_sd), mask=str(mask), queue=url)
        key = Store(root / "service.db").add_tenant("alice")
        with TestClient(create_app(settings)) as client:
            ds = upload(client, key, zip_folder(people)).json()
            job = client.post("/jobs", headers=auth(key), json={"dataset": ds["id"], "steps": 3, "batch_size": 2}).json()
            time.sleep(1.0)
            assert client.get(f"/jobs/{job['id']}", headers=auth(key)).json()["state"] == "queued"   # no thread ran it
            worker = subprocess.run([sys.executable, "-m", "freezeasguard.cli", "worker", "--root", str(root),
                                     "--queue", url, "--burst"], capture_output=True, text=True,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
            assert worker.returncode == 0, worker.stderr[-3000:]
            done = client.get(f"/jobs/{job['id']}", headers=auth(key)).json()
            assert done["state"] == "done" and done["verify"]["compliant"], done
            assert client.get(f"/jobs/{job['id']}/result", headers=auth(key)).status_code == 200
    finally:
        redis.kill()


class RedisServer:
    """A real redis-server on loopback without persistence (Debian's package), restartable empty."""

    def __init__(self):
        import shutil
        import socket
        self.binary = shutil.which("redis-server")
        assert self.binary, "install Debian's redis-server (apt-get install -y redis-server)"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url, self.process = f"redis://127.0.0.1:{self.port}/0", None
        self.start()

    def start(self):
        import socket
        import subprocess
        self.process = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def restart_empty(self):
        """A crash without persistence, or a failover to an empty replica: everything Redis held is gone."""
        self.process.kill()
        self.process.wait(10)
        self.start()

    def stop(self):
        self.process.kill()
        self.process.wait(10)


def _until(condition, timeout=60.0, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _burst_worker(root, url):
    import os
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "freezeasguard.cli", "worker", "--root", str(root), "--queue", url,
                           "--burst"], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)


@pytest.mark.slow
def test_jobs_redis_forgot_are_queued_again_within_the_period_never_twice_and_run(tiny_sd, people, tmp_path):
    from freezeasguard.service.jobs import reconcile, redis_queue

    redis = RedisServer()
    try:
        mask = Mask.random(list(load_denoiser_state(tiny_sd).items()), 0.3, seed=5).save(tmp_path / "mask.safetensors")
        root = tmp_path / "svc"
        settings = ServiceConfig(root=str(root), model=str(tiny_sd), mask=str(mask), queue=redis.url,
                                 reconcile_every=0.3)
        store = Store(root / "service.db")
        key = store.add_tenant("alice")
        queue = redis_queue(redis.url)
        with TestClient(create_app(settings)) as client:
            ds = upload(client, key, zip_folder(people)).json()
            jobs = [client.post("/jobs", headers=auth(key), json={"dataset": ds["id"], "steps": 3, "batch_size": 2}
                                ).json()["id"] for _ in range(2)]
            assert queue.count == 2
            redis.restart_empty()
            assert redis_queue(redis.url).count == 0
            _until(lambda: queue.count == 2, 30, "the reconciler to queue both jobs again")
            time.sleep(1.0)                                  # more periods pass: nothing is queued a second time
            assert queue.count == 2 and reconcile(store, queue, root) == []
            worker = _burst_worker(root, redis.url)
            assert worker.returncode == 0, worker.stderr[-3000:]
            for job_id in jobs:
                done = client.get(f"/jobs/{job_id}", headers=auth(key)).json()
                assert done["state"] == "done" and done["verify"]["compliant"], done
    finally:
        redis.stop()


@pytest.mark.slow
def test_a_job_whose_worker_died_while_redis_lost_its_registries_runs_again_to_the_end(tiny_sd, people, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from freezeasguard.service.jobs import redis_queue

    redis = RedisServer()
    worker = None
    try:
        mask = Mask.random(list(load_denoiser_state(tiny_sd).items()), 0.3, seed=5).save(tmp_path / "mask.safetensors")
        root = tmp_path / "svc"
        settings = ServiceConfig(root=str(root), model=str(tiny_sd), mask=str(mask), queue=redis.url,
                                 reconcile_every=0.3, checkpoint_every=5)
        store = Store(root / "service.db")
        key = store.add_tenant("alice")
        with TestClient(create_app(settings)) as client:
            ds = upload(client, key, zip_folder(people)).json()
            job_id = client.post("/jobs", headers=auth(key), json={"dataset": ds["id"], "steps": 300,
                                                                   "batch_size": 2}).json()["id"]
            worker = subprocess.Popen([sys.executable, "-m", "freezeasguard.cli", "worker", "--root", str(root),
                                       "--queue", redis.url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"})
            _until(lambda: (store.job(job_id) or {}).get("step", 0) >= 10, 300, "the worker to be running the job")
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
            redis.restart_empty()
            assert store.job(job_id)["state"] == "running"     # what the database still believes
            queue = redis_queue(redis.url)
            _until(lambda: queue.count == 1, 30, "the reconciler to queue the job again")
            finished = _burst_worker(root, redis.url)
            assert finished.returncode == 0, finished.stderr[-3000:]
            done = client.get(f"/jobs/{job_id}", headers=auth(key)).json()
            assert done["state"] == "done" and done["step"] == 300 and done["verify"]["compliant"], done
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        redis.stop()


def test_the_dataset_list_and_the_audit_box_give_each_tenant_its_own(service, people, tiny_sd, tmp_path):
    """GET /datasets lists a tenant's datasets with sizes; POST /audit gives each upload a verdict
    against the service's mask (the hub's batch audit) and a CSV of the report; bad uploads are a
    400 naming the file, and another tenant's report is a 404."""
    import csv

    from safetensors.torch import save_file
    client, keys, _, mask = service
    first = upload(client, keys["alice"], zip_folder(people)).json()
    second = upload(client, keys["alice"], zip_folder(people)).json()
    listed = client.get("/datasets", headers=auth(keys["alice"])).json()
    assert [d["id"] for d in listed] == [second["id"], first["id"]]              # newest first
    assert all(d["images"] == 8 and d["bytes"] == first["bytes"] > 0 for d in listed)
    assert client.get("/datasets", headers=auth(keys["bob"])).json() == []
    base = load_denoiser_state(tiny_sd)
    frozen = Mask.load(mask).frozen_names[0]
    save_file(base, str(tmp_path / "same.safetensors"))
    save_file({**base, frozen: base[frozen] + 1e-3}, str(tmp_path / "tampered.safetensors"))
    files = [("files", (n, (tmp_path / n).read_bytes(), "application/octet-stream"))
             for n in ("same.safetensors", "tampered.safetensors")]
    got = client.post("/audit", headers=auth(keys["alice"]), files=files)
    assert got.status_code == 200, got.text
    report = got.json()
    verdicts = {r["file"]: r["verdict"] for r in report["uploads"]}
    assert verdicts == {"same.safetensors": "compliant", "tampered.safetensors": "violations"}
    bad = next(r for r in report["uploads"] if r["verdict"] == "violations")
    assert bad["frozen_changed"] == 1 and bad["first_violation"].startswith(frozen)
    assert report["counts"]["compliant"] == 1 and report["counts"]["violations"] == 1
    table = client.get(report["csv"], headers=auth(keys["alice"]))
    assert table.status_code == 200
    rows = list(csv.DictReader(io.StringIO(table.text)))
    assert {r["file"]: r["verdict"] for r in rows} == verdicts
    assert client.get(report["csv"], headers=auth(keys["bob"])).status_code == 404
    assert not list((tmp_path / "svc" / "audits").rglob("*.safetensors"))        # uploads are not kept
    pickle = client.post("/audit", headers=auth(keys["alice"]), files=[("files", ("model.ckpt", b"x", "a/b"))])
    assert pickle.status_code == 400 and "model.ckpt: not a .safetensors or .gguf file" in pickle.json()["detail"]
    junk = client.post("/audit", headers=auth(keys["alice"]), files=[("files", ("junk.safetensors", b"x" * 20, "a/b"))])
    assert junk.status_code == 200 and junk.json()["uploads"][0]["verdict"] == "unreadable"
    assert junk.json()["uploads"][0]["message"]
    assert client.post("/audit", headers=auth(keys["alice"])).status_code in (400, 422)
