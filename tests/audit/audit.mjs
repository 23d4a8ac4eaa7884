// The GraphQL over HTTP spec's audit suite (graphql-http's serverAudits) against the real
// binary: `node tests/audit/audit.mjs target/debug/tasker`. It starts the server on a free
// port with a fresh SQLite database, runs every audit, prints each result, and exits non-zero
// if any MUST fails (error) or any SHOULD fails (warning). MAY audits print as notices.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { serverAudits } from 'graphql-http';

const binary = process.argv[2];
if (!binary) {
  console.error('usage: node audit.mjs PATH-TO-TASKER-BINARY');
  process.exit(2);
}
const dataDir = mkdtempSync(join(tmpdir(), 'tasker-audit-'));
const server = spawn(
  binary,
  ['serve', '--bind', '127.0.0.1:0', '--data-dir', dataDir, '--no-examples', '--workers', '0',
    '--log-format', 'json'],
  { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, TASKER_LOG: 'info' } },
);
const stop = () => {
  server.kill('SIGTERM');
  rmSync(dataDir, { recursive: true, force: true });
};

// The server logs its address once it listens.
const address = await new Promise((resolve, reject) => {
  const timer = setTimeout(() => reject(new Error('the server did not start within 60 s')), 60_000);
  server.on('exit', (code) => reject(new Error(`the server exited with ${code}`)));
  createInterface({ input: server.stderr }).on('line', (line) => {
    try {
      const entry = JSON.parse(line);
      if (entry.fields?.address && entry.fields.message?.startsWith('listening')) {
        clearTimeout(timer);
        resolve(entry.fields.address);
      }
    } catch {
      // Not a JSON log line.
    }
  });
}).catch((err) => {
  console.error(err.message);
  stop();
  process.exit(1);
});

const url = `http://${address}/graphql`;
const counts = { ok: 0, notice: 0, warn: 0, error: 0 };
try {
  for (const audit of serverAudits({ url })) {
    const result = await audit.fn();
    counts[result.status] += 1;
    const mark = { ok: 'ok    ', notice: 'notice', warn: 'WARN  ', error: 'ERROR ' }[result.status];
    const reason = result.status === 'ok' ? '' : ` — ${result.reason}`;
    console.log(`${mark} ${audit.id} ${audit.name}${reason}`);
  }
} finally {
  // Also when an audit throws: no server or data directory is left behind.
  stop();
}
console.log(
  `\n${counts.ok} passed, ${counts.error} failures (MUST), ${counts.warn} warnings (SHOULD), ${counts.notice} notices (MAY) against ${url}`,
);
process.exit(counts.error + counts.warn > 0 ? 1 : 0);
