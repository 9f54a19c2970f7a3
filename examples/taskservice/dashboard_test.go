package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// envChromium names the browser the dashboard test drives: a path, or
// "1" for chromium on PATH. When it is set the test fails if the browser
// cannot run (CI sets it); when it is not, the test runs if chromium is
// on PATH and is skipped otherwise (go test on a machine with Go alone).
const envChromium = "CACHEASIDE_CHROMIUM"

// envScreenshot is where the test saves its screenshot of the dashboard.
const envScreenshot = "DASHBOARD_SCREENSHOT"

func chromium(t *testing.T) string {
	t.Helper()
	want := os.Getenv(envChromium)
	if want != "" && want != "1" {
		return want
	}
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if want != "" {
		t.Fatalf("%s is set but no chromium is on PATH (Debian: apt-get install chromium)", envChromium)
	}
	t.Skipf("no chromium on PATH; set %s=1 to require it", envChromium)
	return ""
}

// windowWords is how the page's header says the window: as long() in
// dashboard/index.html.
func windowWords(d time.Duration) string {
	if d < time.Second {
		return fmt.Sprintf("%d ms", d.Milliseconds())
	}
	s := int(d.Round(time.Second) / time.Second)
	switch {
	case s == 60:
		return "1 minute"
	case s%60 == 0:
		return fmt.Sprintf("%d minutes", s/60)
	case s < 60:
		return fmt.Sprintf("%d seconds", s)
	}
	return fmt.Sprintf("%d min %d s", s/60, s%60)
}

func TestWindowWords(t *testing.T) {
	for d, want := range map[time.Duration]string{history * time.Second: "10 minutes", time.Minute: "1 minute",
		history * 250 * time.Millisecond: "2 min 30 s", 45 * time.Second: "45 seconds", 250 * time.Millisecond: "250 ms"} {
		if got := windowWords(d); got != want {
			t.Errorf("windowWords(%v) = %q, want %q", d, got, want)
		}
	}
}

// TestDashboardJSON: dashboard.json says how long the window is (history
// samples), and gives the whole of it unless ?points= asks for less.
func TestDashboardJSON(t *testing.T) {
	ta := newTestApp(t, func(e *env) { e.sample = time.Hour }) // the test samples, not the ticker
	now := time.Now()
	for i := range history + 10 {
		ta.mon.sample(now.Add(time.Duration(i) * time.Second))
	}
	var d struct {
		IntervalMillis int64 `json:"interval_ms"`
		WindowMillis   int64 `json:"window_ms"`
		Caches         []struct {
			Name   string           `json:"name"`
			Points []map[string]any `json:"points"`
		} `json:"caches"`
	}
	ta.getJSON(t, "/admin/dashboard.json", http.StatusOK, &d)
	if d.IntervalMillis != time.Hour.Milliseconds() || d.WindowMillis != history*time.Hour.Milliseconds() {
		t.Fatalf("interval_ms %d window_ms %d, want %d and %d", d.IntervalMillis, d.WindowMillis, time.Hour.Milliseconds(), history*time.Hour.Milliseconds())
	}
	if len(d.Caches) == 0 {
		t.Fatal("no caches")
	}
	for _, c := range d.Caches {
		if len(c.Points) != history {
			t.Errorf("%s: %d points, want the whole window (%d)", c.Name, len(c.Points), history)
		}
	}
	ta.getJSON(t, "/admin/dashboard.json?points=10", http.StatusOK, &d)
	if n := len(d.Caches[0].Points); n != 10 {
		t.Errorf("?points=10 gave %d points", n)
	}
}

// axisValue reads a number as the page writes it: 1,500, 2.5, 12.5k, 1.2M.
func axisValue(s string) (float64, error) {
	mul := 1.0
	if k, ok := strings.CutSuffix(s, "k"); ok {
		s, mul = k, 1e3
	} else if m, ok := strings.CutSuffix(s, "M"); ok {
		s, mul = m, 1e6
	}
	v, err := strconv.ParseFloat(strings.ReplaceAll(s, ",", ""), 64)
	return v * mul, err
}

// TestDashboardInChromium loads /admin/ in a real headless Chromium
// against a running app: first without the token (the login page), then
// with it; it drives traffic, stops Redis, and checks that the charts,
// their axes and captions, and the breaker indicator follow; it saves a
// screenshot.
func TestDashboardInChromium(t *testing.T) {
	exe := chromium(t)
	const sample = 250 * time.Millisecond
	ta := newTestApp(t, func(e *env) {
		e.redisURL = "" // the embedded Redis, so the test can stop it
		e.sample = sample
		e.adminToken = "dash-token"
	})
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(exe), chromedp.NoSandbox,
		chromedp.WindowSize(1280, 1500), chromedp.Flag("disable-dev-shm-usage", true))
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelAlloc()
	bctx, cancelBrowser := chromedp.NewContext(actx)
	defer cancelBrowser()
	ctx, cancel := context.WithTimeout(bctx, 90*time.Second)
	defer cancel()

	value := func(js string, v any) {
		t.Helper()
		raw, err := chromedp.Run(ctx, chromedp.Evaluate[json.RawMessage](js))
		if err == nil {
			err = json.Unmarshal(raw, v)
		}
		if err != nil {
			t.Fatalf("%s: %v", js, err)
		}
	}

	// Without the token, and with a wrong one, the browser gets the page
	// that says how to log in; its style applies (the CSP hash is right).
	for _, path := range []string{"/admin/", "/admin/?token=wrong"} {
		if err := chromedp.Do(ctx, chromedp.Navigate(ta.srv.URL+path), chromedp.WaitVisible(`main h1`)); err != nil {
			t.Fatalf("loading %s without the token: %v", path, err)
		}
		var page struct {
			Title, Text, MaxWidth string
		}
		value(`({Title: document.title, Text: document.body.innerText, MaxWidth: getComputedStyle(document.querySelector('main')).maxWidth})`, &page)
		for _, want := range []string{"Admin token required", "/admin/?token=<ADMIN_TOKEN>", "Authorization: Bearer <ADMIN_TOKEN>"} {
			if !strings.Contains(page.Text, want) {
				t.Errorf("%s without the token: the page does not say %q:\n%s", path, want, page.Text)
			}
		}
		if !strings.Contains(page.Title, "admin token required") || page.MaxWidth == "none" {
			t.Errorf("%s without the token: title %q, main's max-width %q (its style blocked?)", path, page.Title, page.MaxWidth)
		}
	}

	// The token once in the URL: the app sets a cookie and redirects to
	// /admin/ without it.
	if err := chromedp.Do(ctx,
		chromedp.Navigate(ta.srv.URL+"/admin/?token=dash-token"),
		chromedp.WaitVisible(`[data-cache="task"] .breaker`),
	); err != nil {
		t.Fatalf("loading the dashboard: %v", err)
	}
	loc, err := chromedp.Run(ctx, chromedp.Location())
	if err != nil {
		t.Fatal(err)
	}
	if loc != ta.srv.URL+"/admin/" {
		t.Fatalf("after login the page is at %s, want /admin/ without the token", loc)
	}
	waitFor := func(what, js string) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			var ok bool
			value(js, &ok)
			if ok {
				return
			}
			if time.Now().After(deadline) {
				var html string
				value(`document.querySelector('[data-cache="task"]').outerHTML.slice(0, 2000)`, &html)
				t.Fatalf("the dashboard never showed %s:\n%s", what, html)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	var gets0 int
	var breaker string
	value(`+document.querySelector('[data-cache="task"] .totals').dataset.gets || 0`, &gets0)
	value(`document.querySelector('[data-cache="task"] .breaker').dataset.state`, &breaker)
	if breaker != "closed" {
		t.Fatalf("breaker indicator %q before any failure", breaker)
	}
	// The header says the window the monitor keeps, from dashboard.json.
	var window string
	value(`document.getElementById('window').textContent`, &window)
	if want := windowWords(history * sample); window != want {
		t.Fatalf("the header says the window is %q, want %q (history × the sampling interval)", window, want)
	}

	// Traffic: hits, misses and 404s.
	for i := range 60 {
		ta.do(t, "GET", fmt.Sprintf("/tasks/%d", 1+i%20), "")
		ta.do(t, "GET", "/tasks/999999", "")
	}
	waitFor("the traffic in its totals and charts", fmt.Sprintf(`(() => {
		const sec = document.querySelector('[data-cache="task"]');
		const gets = +sec.querySelector('.totals').dataset.gets;
		const area = sec.querySelector('[data-chart="gets"] path[data-series="negative"]');
		const rate = sec.querySelector('[data-chart="hitrate"] path[data-series="hit_rate"]');
		return gets >= %d && area && area.getAttribute('d').length > 20 && rate && rate.getAttribute('d').includes('L');
	})()`, gets0+120))

	// Every chart has its scale: y values with the chart's unit, from 0
	// up to at least its highest point, and time from the start of what
	// it shows ("-…") to "now".
	type axes struct {
		Chart string
		Peak  float64
		Y, X  []string
	}
	var charts []axes
	value(`[...document.querySelectorAll('[data-cache="task"] svg.chart')].map(svg => ({
		Chart: svg.dataset.chart, Peak: +svg.dataset.peak,
		Y: [...svg.querySelectorAll('text[data-axis="y"]')].map(e => e.textContent),
		X: [...svg.querySelectorAll('text[data-axis="x"]')].map(e => e.textContent)}))`, &charts)
	units := map[string]string{"hitrate": "%", "gets": "/s", "loads": "/s", "latency": " ms", "redis": "/s"}
	if len(charts) != len(units) {
		t.Fatalf("%d charts, want %d: %+v", len(charts), len(units), charts)
	}
	for _, c := range charts {
		unit := units[c.Chart]
		if len(c.Y) < 2 || c.Y[0] != "0"+unit {
			t.Errorf("chart %s: y axis %q, want 0%s and more", c.Chart, c.Y, unit)
		}
		for _, y := range c.Y {
			if !strings.HasSuffix(y, unit) {
				t.Errorf("chart %s: y label %q without its unit %q", c.Chart, y, unit)
			}
		}
		top, err := axisValue(strings.TrimSuffix(c.Y[len(c.Y)-1], unit))
		if unit == "%" {
			top /= 100
		}
		if err != nil || top < c.Peak {
			t.Errorf("chart %s: y axis ends at %q, below its highest point %v", c.Chart, c.Y[len(c.Y)-1], c.Peak)
		}
		if len(c.X) < 2 || c.X[0] != "now" || !strings.HasPrefix(c.X[1], "-") {
			t.Errorf("chart %s: time axis %q, want now and the start (-…)", c.Chart, c.X)
		}
	}

	// Traffic stopped: the captions' "last" drops to 0 while the peak
	// and the total over the window keep what happened.
	waitFor("last 0 beside the peak and total of the traffic", `(() => {
		const stat = (chart, s) => document.querySelector('[data-cache="task"] [data-panel="' + chart + '"] [data-stat="' + s + '"]');
		const v = (chart, s) => stat(chart, s) ? stat(chart, s).dataset.value : undefined;
		return v('gets', 'last') === '0' && +v('gets', 'peak') > 0 && +v('gets', 'total') >= 120 &&
			v('loads', 'last') === '0' && +v('loads', 'peak') > 0 && +v('loads', 'total') >= 1 &&
			v('latency', 'last') === '' && !!v('latency', 'peak') && !!v('latency', 'mean') &&
			+v('hitrate', 'peak') > 0 && +v('hitrate', 'window') > 0;
	})()`)
	var captions map[string]string
	value(`Object.fromEntries([...document.querySelectorAll('[data-cache="task"] .panel')].map(p => [p.dataset.panel, p.querySelector('.now').textContent]))`, &captions)
	for chart, want := range map[string][]string{"gets": {"last 0/s", "peak ", "/s", "total "}, "loads": {"last 0/s", "peak ", "total "},
		"latency": {"last no loads", "peak ", " ms", "mean "}, "hitrate": {"last ", "low ", "peak ", "window "}} {
		for _, w := range want {
			if !strings.Contains(captions[chart], w) {
				t.Errorf("the %s caption %q does not say %q", chart, captions[chart], w)
			}
		}
	}
	var notFound string
	value(`document.querySelector('[data-cache="task"] [data-panel="gets"] .legend [data-key="negative"]').textContent`, &notFound)
	if !strings.HasPrefix(notFound, "not found (tombstone) ") || notFound == "not found (tombstone) 0" {
		t.Errorf("the Gets legend says %q, want the tombstone hits' total", notFound)
	}

	// The staleness audit panel: its button runs an audit of the task
	// cache, and the table shows it (the 20 tasks and the "not found"
	// sampled, none stale).
	var clicked bool
	value(`(() => { const b = document.querySelector('button[data-audit="task"]'); if (b) b.click(); return !!b; })()`, &clicked)
	if !clicked {
		t.Fatal("no audit button on the dashboard")
	}
	waitFor("the task audit in the audit table", `(() => {
		const row = document.querySelector('#audit-rows tr[data-audit-cache="task"]');
		return !!row && row.children[2].textContent === '21' && row.children[3].textContent === '0';
	})()`)

	// Redis stops: the breaker opens and the indicator says so.
	ta.mini.Close()
	for i := range 20 {
		ta.do(t, "GET", fmt.Sprintf("/tasks/%d", 100+i), "")
	}
	waitFor("the breaker open", `document.querySelector('[data-cache="task"] .breaker').dataset.state === 'open'`)
	waitFor("Redis failures in their chart", `+document.querySelector('[data-cache="task"] [data-chart="redis"]').dataset.peak > 0`)
	// The local tier is bypassed once its subscriber has seen the
	// connection go, which on a busy machine may come after the breaker.
	waitFor("the local tier indicator bypassed", `document.querySelector('[data-cache="task"] .local').dataset.state === 'bypassed'`)

	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	path := os.Getenv(envScreenshot)
	if path == "" {
		path = filepath.Join(t.TempDir(), "dashboard.png")
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("dashboard screenshot (%d bytes): %s", len(png), path)
}
