// Drives the browser client in headless Chromium against a running edge:
//   node clients/js/test/browser-test.mjs <edge URL> <write key>
// Prints one JSON line: the event ids each scenario sent and what the
// client saw. tests/browser.rs starts `outpost dev`, runs this, and looks
// the ids up through the query API.
import { chromium } from "playwright-core";
import { readFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";
import path from "node:path";

const [edge, writeKey] = process.argv.slice(2);
const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "..");
// The page's own origin, served from the files below. A loopback origin
// other than the edge's: the client's requests are cross-origin (CORS, as
// in production) but stay in one address space, so Chromium's local
// network access checks do not block a plain-http page.
const APP = "http://localhost:9";

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  // The page is served by the test (route.fulfill), which Chromium treats
  // as public: its local network access checks would then refuse every
  // request to the edge on 127.0.0.1. Production pages and edges are both
  // public, so the check has nothing to say here.
  args: [
    "--no-sandbox",
    "--headless=new",
    "--disable-features=LocalNetworkAccessChecks,BlockInsecurePrivateNetworkRequests,PrivateNetworkAccessSendPreflights",
  ],
});
const result = {};
try {
  for (const build of ["module", "global"]) {
    const page = await browser.newPage();
    page.on("console", (m) => console.error(`[${build}] ${m.type()}: ${m.text()}`));
    // The page and the client come from the files, under an origin of their own.
    await page.route(`${APP}/**`, async (route) => {
      const rel = new URL(route.request().url()).pathname.slice(1);
      const type = rel.endsWith(".html") ? "text/html" : "text/javascript";
      route.fulfill({ body: await readFile(path.join(root, rel)), contentType: type });
    });
    // The edge's first answer is a 503 with Retry-After: the client must
    // retry the same events (same ids) and not lose or double them.
    let refusals = 0;
    await page.route(`${edge}/v1/batch**`, async (route) => {
      if (route.request().method() === "POST" && refusals === 0) {
        refusals += 1;
        return route.fulfill({
          status: 503,
          headers: { "Retry-After": "1", "Access-Control-Allow-Origin": "*" },
          contentType: "application/json",
          body: JSON.stringify({ success: false, code: 50301, message: "test refusal", request_id: "t", errors: [] }),
        });
      }
      return route.continue();
    });
    await page.goto(`${APP}/test/page.html?build=${build}`);
    const ids = await page.evaluate(
      async ({ edge, writeKey, build }) => {
        const outpost = await window.ready;
        window.client = outpost.init({
          endpoint: edge,
          writeKey,
          batchSize: 10,
          flushIntervalMs: 200,
          minBackoffMs: 200,
        });
        outpost.identify(`user-${build}`);
        const ids = [
          outpost.track("page_view", { path: "/pricing", build }),
          outpost.track("signup", { plan: "pro", build }),
          outpost.log("warn", "slow checkout", { logger: "cart", ms: 2300, build }),
        ];
        await outpost.flush();
        return ids;
      },
      { edge, writeKey, build },
    );
    // Until the client's queue is empty: the refusal, the wait it asked
    // for, and the retry.
    await page.waitForFunction(() => window.client.stats().queued === 0, null, {
      timeout: 20000,
    });
    const stats = await page.evaluate(() => window.client.stats());
    // The page going away: a client with events still queued (its timer is
    // far off) hands them to navigator.sendBeacon, a text/plain POST. The
    // browser sends it after the page has gone, but the test's routes die
    // with the page (and everything with the browser): wait for its answer
    // before closing, as a real browser that lives on would.
    const beaconAnswer = page
      .waitForEvent("requestfinished", {
        predicate: (r) => r.method() === "POST" && r.url().startsWith(`${edge}/v1/batch`),
        timeout: 20000,
      })
      .then(async (r) => (await r.response())?.status() ?? null)
      .catch((e) => `not answered: ${e.message}`);
    const beacon = await page.evaluate(
      async ({ edge, writeKey, build }) => {
        const outpost = await window.ready;
        const c = outpost.createClient({ endpoint: edge, writeKey, flushIntervalMs: 600000 });
        c.identify(`user-${build}`);
        const id = c.track("page_leave", { build });
        const before = c.stats().queued;
        window.dispatchEvent(new Event("pagehide"));
        return { id, before, after: c.stats().queued };
      },
      { edge, writeKey, build },
    );
    beacon.status = await beaconAnswer;
    result[build] = { ids, refusals, stats, beacon };
    await page.close();
  }
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
