"""The dashboard at GET /, in headless Chromium against the real daemon.

Most tests load the page once with `chromium --headless --dump-dom
--virtual-time-budget=...` and read the DOM it leaves: the session rows
(data-session), the four charts (data-points: values drawn; data-scale).
The tests that must type, switch sessions or wait for live data drive one
shared Chromium over its DevTools pipe (harness.Browser), a fresh tab and
browser context each. Set OPTD_SCREENSHOT=docs/dashboard.png to keep the
1280x800 screenshot that test_screenshot takes."""

import contextlib
import os
import random
import re
import shutil
import tempfile
import threading
import time
import unittest

from harness import Browser, Daemon, chromium_path, dump_dom, parse_dom, screenshot

CHARTS = ("loss", "grad_norm", "update_norm", "lr")
BUDGET_MS = 4000
_browser = None


def need_chromium():
    if not chromium_path():
        raise unittest.SkipTest("chromium is not installed (apt-get install chromium)")


def new_tab():
    """A fresh tab of the module's Chromium (started on first use)."""
    global _browser
    need_chromium()
    if _browser is None:
        _browser = Browser()
    return _browser.tab()


@contextlib.contextmanager
def page(case, url):
    """A fresh tab at url for the block, closed after it; when the block
    ends normally, case asserts that the page raised no uncaught exception."""
    t = new_tab()
    try:
        t.goto(url)
        yield t
        case.assertEqual(t.exceptions(), [], "uncaught exceptions in the page")
    finally:
        t.close()


def tearDownModule():
    global _browser
    if _browser is not None:
        _browser.close()
        _browser = None


def points(key):
    """JavaScript: the data-points of one chart."""
    return "document.getElementById('chart-%s').dataset.points" % key


def train(d, name, steps, n=64, seed=1, optimizer="adam", hyperparams=None, loss=True):
    """Creates name (unless it exists) and trains it on an ill-conditioned
    quadratic with noise, sending the loss with every step when asked."""
    rng = random.Random(seed)
    if d.request("GET", "/v1/sessions/" + name).status == 404:
        d.ok("POST", "/v1/sessions", {"name": name, "optimizer": optimizer,
                                      "params": [rng.uniform(-2, 2) for _ in range(n)],
                                      "hyperparams": hyperparams or {}})
    curv = [10 ** (-2 + 3 * i / (n - 1)) for i in range(n)]
    p = d.ok("GET", "/v1/sessions/%s/params" % name)["params"]
    for _ in range(steps):
        body = {"grad": [curv[i] * p[i] + rng.gauss(0, 0.02) for i in range(n)]}
        if loss:
            body["loss"] = 0.5 * sum(curv[i] * p[i] ** 2 for i in range(n))
        p = d.ok("POST", "/v1/sessions/%s/step" % name, body)["params"]


class DaemonCase(unittest.TestCase):
    """One daemon (--sync normal, daemon_env, daemon_token) for the class's
    tests, given its sessions by the class's populate(d)."""

    daemon_env = None
    daemon_token = None

    @classmethod
    def populate(cls, d):
        pass

    @classmethod
    def setUpClass(cls):
        cls.d = Daemon(args=["--sync", "normal"], env=cls.daemon_env, token=cls.daemon_token).start()
        try:
            cls.populate(cls.d)
        except BaseException:
            cls.d.cleanup()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.d.cleanup()


class DashboardTests(DaemonCase):
    """A daemon with three sessions: one trained 300 steps with losses and an
    lr schedule, one without losses, one never stepped."""

    @classmethod
    def populate(cls, d):
        train(d, "resnet-demo", 300, hyperparams={
            "lr": 0.05, "lr_schedule": {"type": "cosine", "T_max": 300, "eta_min": 0.001, "warmup_steps": 20}})
        train(d, "sgd-baseline", 20, n=1000, optimizer="sgd", hyperparams={"lr": 0.001, "momentum": 0.9},
              loss=False)
        d.ok("POST", "/v1/sessions", {"name": "workers-x4", "optimizer": "adamw", "size": 4096, "workers": 4})
        cls.rows = d.history("resnet-demo")
        cls.dom = None

    def main_dom(self):
        """The DOM after loading #session=resnet-demo, dumped once for the class."""
        need_chromium()
        if DashboardTests.dom is None:
            DashboardTests.dom = parse_dom(dump_dom(self.d.url + "#session=resnet-demo", BUDGET_MS))
        return DashboardTests.dom

    def charts(self, dom):
        out = {}
        for key in CHARTS:
            fig = dom.by_id("chart-" + key)
            self.assertIsNotNone(fig, "no figure #chart-%s" % key)
            out[key] = fig
        return out

    def test_root_serves_one_self_contained_page(self):
        r = self.d.request("GET", "/")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.header("Content-Type").split(";")[0], "text/html")
        page = r.body.decode("utf-8")
        self.assertNotRegex(page, r"(?i)<script[^>]+src=", "scripts must be inline")
        self.assertNotRegex(page, r"(?i)<link[^>]+stylesheet", "styles must be inline")
        self.assertNotRegex(page, r"(?i)(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", "no external URL")
        self.assertNotRegex(page, r"(?i)@import|url\(\s*['\"]?https?:", "no external CSS")
        for path in re.findall(r"api\('([^']*)", page):
            self.assertTrue(path.startswith("v1/"), "fetches are relative /v1 paths: %r" % path)

    def test_selected_session_shows_its_rows_and_four_charts(self):
        dom = self.main_dom()
        rows = dom.find(lambda n: n.tag == "tr" and "data-session" in n.attrs)
        self.assertEqual([r.get("data-session") for r in rows], ["resnet-demo", "sgd-baseline", "workers-x4"])
        row = rows[0]
        self.assertEqual(row.get("aria-current"), "true")
        cells = [c.text().strip() for c in row.children if not isinstance(c, str)]
        self.assertEqual(cells[:5], ["resnet-demo", "adam", "f32", "64", "300"], cells)
        self.assertEqual(rows[1].get("aria-current"), "false")

        self.assertEqual(len(self.rows), 300)
        for key, fig in self.charts(dom).items():
            self.assertEqual(fig.get("data-points"), str(len(self.rows)), "chart %s" % key)
        self.assertFalse(dom.by_id("detail-body").hidden())
        self.assertEqual(dom.by_id("detail-h").text(), "resnet-demo")
        hp = dom.by_id("hyperparams").text()
        for name in ("lr", "betas", "eps", "lr_schedule", "cosine", "T_max=300", "max_grad_norm"):
            self.assertIn(name, hp)
        workers = dom.by_id("workers").text()
        for name in ("workers", "min_workers", "round_timeout"):
            self.assertIn(name, workers)
        self.assertIn("step 300", dom.by_id("meta").text())
        self.assertEqual(dom.by_id("auth").get("data-state"), "hidden")
        self.assertIn("live", dom.by_id("status").text())

    def test_norms_spanning_decades_get_a_log_axis_and_lr_a_linear_one(self):
        charts = self.charts(self.main_dom())
        self.assertEqual(charts["loss"].get("data-scale"), "log")
        self.assertEqual(charts["grad_norm"].get("data-scale"), "log")
        self.assertEqual(charts["lr"].get("data-scale"), "linear")

    def test_session_without_losses_draws_no_loss_points(self):
        with page(self, self.d.url + "#session=sgd-baseline") as t:
            t.wait(points("grad_norm") + " === '20'", what="20 gradient norms")
            self.assertEqual(t.eval(points("loss")), "0")
            self.assertEqual(t.eval(points("update_norm")), "20")
            self.assertEqual(t.eval(points("lr")), "20")
            self.assertIn("1,000", t.eval("document.getElementById('meta').textContent"))

    def test_switching_sessions_by_fragment(self):
        with page(self, self.d.url + "#session=resnet-demo") as t:
            t.wait(points("loss") + " === '300'", what="resnet-demo's charts")
            # Same document: only the fragment changes, as a click on a row does.
            t.eval("location.hash = '#session=workers-x4', true")
            t.wait("document.getElementById('detail-h').textContent === 'workers-x4'", what="workers-x4")
            t.wait(" && ".join(points(k) + " === '0'" for k in CHARTS), what="empty charts")
            self.assertRegex(t.eval("document.getElementById('workers').textContent"), r"workers\s*4")
            self.assertEqual(t.eval("document.querySelector('tr[aria-current=true]').dataset.session"), "workers-x4")
            # A click on a row selects it.
            t.eval("document.querySelector('tr[data-session=\"sgd-baseline\"] td').click(), true")
            t.wait(points("lr") + " === '20'", what="sgd-baseline's charts")
            self.assertEqual(t.eval("location.hash"), "#session=sgd-baseline")
            self.assertEqual(t.eval("document.title"), "optd — sgd-baseline")

    def test_unknown_session_says_so(self):
        with page(self, self.d.url + "#session=no-such-run") as t:
            t.wait("document.querySelectorAll('tr[data-session]').length === 3", what="the rows")
            t.wait("document.getElementById('detail-empty').textContent.includes('No session named')",
                   what="the not-found note")
            self.assertTrue(t.eval("document.getElementById('detail-body').hidden"))

    def test_no_fragment_selects_the_session_stepped_last(self):
        with page(self, self.d.url) as t:
            name = t.wait("document.getElementById('detail-h').textContent", what="a selected session")
            self.assertIn(name, ("resnet-demo", "sgd-baseline"))
            self.assertEqual(t.eval("location.hash"), "#session=" + name)

    def test_screenshot(self):
        need_chromium()
        keep = os.environ.get("OPTD_SCREENSHOT")
        tmp = tempfile.mkdtemp(prefix="optd-shot-")
        try:
            path = os.path.join(tmp, "dashboard.png")
            self.assertEqual(screenshot(self.d.url + "#session=resnet-demo", path, budget_ms=BUDGET_MS), (1280, 800))
            self.assertGreater(os.path.getsize(path), 30000, "a blank page compresses far smaller")
            if keep:
                shutil.copyfile(path, keep)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class ListPagingTests(unittest.TestCase):
    """More sessions than one page of GET /v1/sessions (1000)."""

    def test_every_page_is_listed(self):
        need_chromium()
        d = Daemon(args=["--sync", "normal"]).start()
        try:
            names = ["run-%04d" % i for i in range(1003)]
            for name in names:
                d.ok("POST", "/v1/sessions", {"name": name, "optimizer": "sgd", "size": 1})
            first = d.ok("GET", "/v1/sessions?limit=1000")
            self.assertIsNotNone(first["next"], "the listing must need a second page")
            with page(self, d.url + "#session=run-1002") as t:
                t.wait("document.getElementById('detail-h').textContent === 'run-1002'", what="run-1002")
                rows = t.wait("(() => { const r = [...document.querySelectorAll('tr[data-session]')];"
                              " return r.length === 1003 && r.map((x) => x.dataset.session); })()", what="1003 rows")
                self.assertEqual(rows, names)
                self.assertEqual(t.eval("document.getElementById('session-count').textContent"), "(1,003)")
                # The filter hides the rows that do not match.
                t.eval("(() => { const f = document.getElementById('filter'); f.value = 'run-09';"
                       " f.dispatchEvent(new Event('input')); return true; })()")
                self.assertEqual(t.eval("document.querySelectorAll('tr[data-session]:not([hidden])').length"), 100)
        finally:
            d.cleanup()


class TokenTests(DaemonCase):
    """A daemon with OPTD_TOKEN: the page asks for the token and shows nothing before."""

    daemon_env = {"OPTD_TOKEN": "secret"}
    daemon_token = "secret"

    @classmethod
    def populate(cls, d):
        train(d, "guarded-run", 30, n=8)

    def test_page_itself_needs_no_token(self):
        self.assertEqual(self.d.request("GET", "/", auth=False).status, 200)
        self.assertEqual(self.d.request("GET", "/v1/sessions", auth=False).status, 401)

    def prompt(self, dom):
        auth = dom.by_id("auth")
        self.assertFalse(auth.hidden(), "the token form must show")
        self.assertEqual(auth.get("data-state"), "shown")
        field = dom.by_id("auth-token")
        self.assertEqual(field.get("type"), "password")
        labels = dom.find(lambda n: n.tag == "label" and n.get("for") == "auth-token")
        self.assertEqual(len(labels), 1, "the token field needs a label")
        self.assertTrue(dom.by_id("app").hidden(), "no session pane behind the prompt")
        self.assertEqual(dom.find(lambda n: n.tag == "tr" and "data-session" in n.attrs), [])

    def test_dump_dom_shows_the_prompt_and_no_session_data(self):
        need_chromium()
        html = dump_dom(self.d.url, BUDGET_MS)
        self.prompt(parse_dom(html))
        self.assertNotIn("guarded-run", html)

    def test_prompt_with_a_session_in_the_fragment(self):
        with page(self, self.d.url + "#session=guarded-run") as t:
            t.wait("document.getElementById('auth').dataset.state === 'shown'", what="the token prompt")
            time.sleep(2)  # a poll period: nothing may arrive meanwhile
            self.assertTrue(t.eval("document.getElementById('app').hidden"))
            self.assertEqual(t.eval("document.querySelectorAll('tr[data-session]').length"), 0)
            self.assertEqual(t.eval("document.getElementById('hyperparams').textContent"), "")
            for key in CHARTS:
                self.assertEqual(t.eval(points(key)), "0")
            self.assertEqual(t.eval("document.activeElement.id"), "auth-token", "the field has the focus")

    def test_token_is_asked_once_per_tab_and_sent_as_bearer(self):
        with page(self, self.d.url + "#session=guarded-run") as t:
            t.wait("document.getElementById('auth').dataset.state === 'shown'", what="the token prompt")
            submit = ("(() => { document.getElementById('auth-token').value = %s;"
                      " document.getElementById('auth-form').requestSubmit(); return true; })()")
            t.eval(submit % "'wrong'")
            t.wait("document.getElementById('auth-error').textContent.includes('refused')", what="a refusal")
            self.assertIsNone(t.eval("sessionStorage.getItem('optd.token')"))
            self.assertEqual(t.eval("document.querySelectorAll('tr[data-session]').length"), 0)

            t.eval(submit % "'secret'")
            t.wait(points("loss") + " === '30'", what="the charts")
            self.assertEqual(t.eval("sessionStorage.getItem('optd.token')"), "secret")
            self.assertTrue(t.eval("document.getElementById('auth').hidden"))

            # Reloaded in the same tab: no second prompt.
            t.eval("location.reload(), true")
            time.sleep(0.3)
            t.wait("document.readyState === 'complete' && " + points("lr") + " === '30'",
                   what="the charts after reload")
            self.assertEqual(t.eval("document.getElementById('auth').dataset.state"), "hidden")


class LiveTests(DaemonCase):
    """The page follows a session while it trains, fetching only new history."""

    @classmethod
    def populate(cls, d):
        train(d, "live-run", 50, n=16, hyperparams={"lr": 0.02})

    def test_new_steps_appear_and_only_new_history_is_fetched(self):
        with page(self, self.d.url + "#session=live-run") as t:
            t.wait("document.getElementById('chart-loss').dataset.points === '50'", what="50 points")
            # Pixels of each chart's colour on its canvas: the line was drawn.
            painted = t.eval("""[...document.querySelectorAll('figure.chart')].map((f) => {
                const cv = f.querySelector('canvas'), ctx = cv.getContext('2d');
                const want = getComputedStyle(document.documentElement).getPropertyValue('--c-' + f.dataset.key).trim();
                const rgb = [1, 3, 5].map((i) => parseInt(want.slice(i, i + 2), 16));
                const px = ctx.getImageData(0, 0, cv.width, cv.height).data;
                let n = 0;
                for (let i = 0; i < px.length; i += 4)
                  if (px[i + 3] > 100 && Math.abs(px[i] - rgb[0]) + Math.abs(px[i + 1] - rgb[1]) + Math.abs(px[i + 2] - rgb[2]) < 60) n++;
                return [f.dataset.key, n];
            })""")
            for key, n in painted:
                self.assertGreater(n, 50, "chart %s shows no line" % key)

            train(self.d, "live-run", 25, n=16, seed=2)
            t.wait("document.getElementById('chart-loss').dataset.points === '75'", what="75 points")
            t.wait("document.querySelector('tr[data-session=\"live-run\"]').children[4].textContent === '75'",
                   what="the row's step")
            urls = t.eval("performance.getEntriesByType('resource').map((e) => e.name)")
            afters = [int(m.group(1)) for u in urls for m in [re.search(r"/history\?after=(\d+)", u)] if m]
            # The first read starts at 0; each later one after the last step
            # already held (50, or a step reached while the 25 were being
            # sent); a poll that finds no new step reads no history.
            self.assertEqual(afters[0], 0, urls)
            self.assertEqual(afters[1], 50, urls)
            self.assertTrue(all(a < b for a, b in zip(afters, afters[1:])), afters)
            self.assertLess(afters[-1], 75)

    def test_steps_per_second_while_training(self):
        need_chromium()
        self.d.ok("POST", "/v1/sessions", {"name": "rate-run", "optimizer": "sgd", "size": 4})
        trainer, stop = self.d.client(), threading.Event()

        def steady():  # about 20 steps/s
            while not stop.is_set():
                trainer.ok("POST", "/v1/sessions/rate-run/step", {"grad": [0.1, 0.2, 0.3, 0.4], "loss": 1.0})
                time.sleep(0.05)
        worker = threading.Thread(target=steady, daemon=True)
        worker.start()
        try:
            with page(self, self.d.url + "#session=rate-run") as t:
                got = t.wait("(() => { const r = document.querySelector('tr[data-session=\"rate-run\"]');"
                             " const v = r && parseFloat(r.children[5].textContent); return v > 0 ? v : 0; })()",
                             what="a steps/s figure", timeout=15)
                self.assertGreater(got, 2)
                self.assertLess(got, 40)
                t.wait("/[1-9][0-9.]* steps\\/s/.test(document.getElementById('meta').textContent)",
                       what="steps/s in the session's header")
        finally:
            stop.set()
            worker.join(10)
            trainer.close()

    def test_scale_select_switches_between_linear_and_log(self):
        with page(self, self.d.url + "#session=live-run") as t:
            t.wait("document.getElementById('chart-loss').dataset.points !== '0'", what="the charts")
            pick = ("(() => { const f = document.getElementById('chart-update_norm'), s = f.querySelector('select');"
                    " s.value = %s; s.dispatchEvent(new Event('change')); return f.dataset.scale; })()")
            self.assertEqual(t.eval(pick % "'log'"), "log")
            self.assertEqual(t.eval(pick % "'linear'"), "linear")
            label = t.eval("document.querySelector('#chart-update_norm canvas').getAttribute('aria-label')")
            self.assertIn("linear scale", label)
            self.assertIn("Update norm", label)
            # Hovering reads out the nearest step; leaving shows the last one again.
            hover = ("(() => { const c = document.querySelector('#chart-loss canvas'), r = c.getBoundingClientRect();"
                     " c.dispatchEvent(new MouseEvent(%s, {clientX: r.left + r.width / 2, clientY: r.top + 20}));"
                     " return document.querySelector('#chart-loss .readout').textContent; })()")
            mid = t.eval(hover % "'mousemove'")
            self.assertRegex(mid, r"^\S+ · step \d+$")
            self.assertNotIn("step 75", mid)
            self.assertRegex(t.eval(hover % "'mouseleave'"), r" · step (50|75)$")
