package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
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

// TestDashboardInChromium loads /admin/ in a real headless Chromium
// against a running app, drives traffic, stops Redis, and checks that the
// charts and the breaker indicator follow; it saves a screenshot.
func TestDashboardInChromium(t *testing.T) {
	exe := chromium(t)
	ta := newTestApp(t, func(e *env) {
		e.redisURL = "" // the embedded Redis, so the test can stop it
		e.sample = 250 * time.Millisecond
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

	// Redis stops: the breaker opens and the indicator says so.
	ta.mini.Close()
	for i := range 20 {
		ta.do(t, "GET", fmt.Sprintf("/tasks/%d", 100+i), "")
	}
	waitFor("the breaker open", `document.querySelector('[data-cache="task"] .breaker').dataset.state === 'open'`)
	waitFor("Redis failures in their chart", `+document.querySelector('[data-cache="task"] [data-chart="redis"]').dataset.peak > 0`)
	var local string
	value(`document.querySelector('[data-cache="task"] .local').dataset.state`, &local)
	if local != "bypassed" {
		t.Fatalf("local tier indicator %q with Redis gone, want bypassed", local)
	}

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
