"""What a user of the public API waits for, against a real `tasker serve` (release build):

    python3 benches/http_load.py target/release/tasker

On a fresh SQLite database with the example templates and the embedded worker pool, it times
1,000 createTask round trips one after another and 2,000 from 8 concurrent clients (each task
has 5 steps, run by the pool meanwhile), the time until all 3,000 tasks completed counted
from the first request (creation included), the server's CPU per step, a page of 100 tasks
with nested steps, graph and transitions, and the raw commit rate of SQLite in the same
place with the server's settings, so the figures read as ratios on any machine. Prints one
JSON object. Python 3 standard library only."""
import http.client, json, os, statistics, subprocess, sys, tempfile, threading, time

import socket

BIN = sys.argv[1]
with socket.socket() as probe:  # a free port for the server
    probe.bind(("127.0.0.1", 0))
    PORT = probe.getsockname()[1]
HZ = os.sysconf("SC_CLK_TCK")

def post(conn, query, variables=None):
    body = json.dumps({"query": query, "variables": variables or {}})
    conn.request("POST", "/graphql", body, {"Content-Type": "application/json"})
    r = conn.getresponse(); data = json.loads(r.read())
    if "errors" in data: raise SystemExit(f"error: {data['errors']}")
    return data["data"]

def pct(xs, p): xs = sorted(xs); return xs[min(len(xs) - 1, int(len(xs) * p))]

CREATE = """mutation($i: Int!) { createTask(input: { namespace: "inventory", template: "restock",
  context: { n: $i } }) { task { id state steps { name state } } } }"""
PAGE = """{ tasks(first: 100) { edges { node { id state template { key }
  steps { name state parents { name } } edges { parentId } graph { levels { level } }
  transitions { toState } } } } }"""

def raw_commits(data):
    """Commits per second of SQLite itself in the same place: WAL, synchronous NORMAL, one
    small row per transaction (the server's settings)."""
    import sqlite3
    db = sqlite3.connect(os.path.join(data, "raw.db"), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL"); db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    t = time.perf_counter()
    for i in range(5000):
        db.execute("BEGIN"); db.execute("INSERT INTO t (v) VALUES (?)", (str(i),)); db.execute("COMMIT")
    rate = 5000 / (time.perf_counter() - t)
    db.close(); os.remove(os.path.join(data, "raw.db"))
    return round(rate)

def main():
    data = tempfile.mkdtemp()
    raw = raw_commits(data)
    server = subprocess.Popen([BIN, "serve", "--bind", f"127.0.0.1:{PORT}", "--data-dir", data],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "RUST_LOG": "warn"})
    try:
        for _ in range(600):  # the server's start: up to 30 s
            try:
                c = http.client.HTTPConnection("127.0.0.1", PORT); c.request("GET", "/health/ready")
                if c.getresponse().status == 200: break
            except OSError: pass
            time.sleep(0.05)
        else:
            raise SystemExit("the server did not become ready")
        conn = http.client.HTTPConnection("127.0.0.1", PORT)
        cpu0 = cpu(server.pid); t0 = time.perf_counter()
        lat = []
        for i in range(1000):
            s = time.perf_counter(); post(conn, CREATE, {"i": i}); lat.append(time.perf_counter() - s)
        seq_s = time.perf_counter() - t0
        conc = []; lock = threading.Lock()
        def client(k):
            c = http.client.HTTPConnection("127.0.0.1", PORT); mine = []
            for i in range(250):
                s = time.perf_counter(); post(c, CREATE, {"i": k * 1000 + i}); mine.append(time.perf_counter() - s)
            with lock: conc.extend(mine)
        t1 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        conc_s = time.perf_counter() - t1
        # every task (3,000 x 5 steps) complete: what a user waits for, creation included
        while post(conn, '{ tasks(filter: { states: [COMPLETE] }) { totalCount } }')["tasks"]["totalCount"] < 3000:
            time.sleep(0.01)
        done_s = time.perf_counter() - t0
        cpu_s = (cpu(server.pid) - cpu0) / HZ
        page = []
        for _ in range(30):
            s = time.perf_counter(); post(conn, PAGE); page.append(time.perf_counter() - s)
        print(json.dumps({
            "create_seq_p50_ms": round(pct(lat, .5) * 1e3, 2), "create_seq_p99_ms": round(pct(lat, .99) * 1e3, 2),
            "create_seq_per_s": round(1000 / seq_s), "create_8c_per_s": round(2000 / conc_s),
            "create_8c_p50_ms": round(pct(conc, .5) * 1e3, 2), "create_8c_p99_ms": round(pct(conc, .99) * 1e3, 2),
            "all_3000_complete_s": round(done_s, 2), "steps_per_s_end_to_end": round(15000 / done_s),
            "server_cpu_ms_per_step": round(cpu_s * 1e3 / 15000, 3),
            "page100_nested_p50_ms": round(pct(page, .5) * 1e3, 1),
            "raw_sqlite_commits_per_s": raw}))
    finally:
        server.terminate(); server.wait()
        import shutil; shutil.rmtree(data, ignore_errors=True)

def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])

main()
