package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"embed"
	"encoding/base64"
	"encoding/hex"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/seed-b4ec662f/cacheaside"
	"github.com/seed-b4ec662f/cacheaside/extra/cacheprometheus"
)

// The live dashboard (lecture 5.4, "know whether the cache helps"): a
// monitor samples every cache's Stats once per interval and keeps the last
// history intervals of per-interval changes (the window); /admin/ is one
// embedded page that draws them, and /admin/dashboard.json is what it polls
// every second, the window's length included, so the page says what the
// monitor keeps. Nothing is fetched from elsewhere at run time.

//go:embed dashboard/index.html
var dashboardFS embed.FS

// dashboardHTML is the page; dashboardCSP allows exactly its one inline
// script and one inline style block, by hash, and fetches from this
// origin only: no inline code an injection could add would run.
var dashboardHTML, dashboardCSP = func() ([]byte, string) {
	b, err := dashboardFS.ReadFile("dashboard/index.html")
	if err != nil {
		panic(err)
	}
	return b, "default-src 'none'; script-src " + inlineHash(b, "script") + "; style-src " + inlineHash(b, "style") +
		"; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
}()

// inlineHash is the CSP source that allows the content of page's one
// <tag> element, and nothing else inline.
func inlineHash(page []byte, tag string) string {
	m := regexp.MustCompile(`(?s)<` + tag + `>(.*?)</` + tag + `>`).FindSubmatch(page)
	if m == nil {
		panic("dashboard: no <" + tag + "> in the page")
	}
	sum := sha256.Sum256(m[1])
	return "'sha256-" + base64.StdEncoding.EncodeToString(sum[:]) + "'"
}

// loginHTML is what a browser that asks for an admin page without a valid
// token or cookie gets (401): how to log in. A constant: nothing from the
// request is in it. loginCSP allows its style block and nothing else.
var loginHTML = []byte(`<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>taskservice: admin token required</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { margin: 0; font: 15px/1.5 system-ui, sans-serif; background: #f7f7f5; color: #1d1d1f; }
  main { max-width: 42em; margin: 48px auto; padding: 20px 28px; background: #fff; border: 1px solid #e4e4e0; border-radius: 8px; }
  h1 { font-size: 20px; margin: 0 0 12px; }
  code { background: #f0f0ec; padding: 1px 4px; border-radius: 3px; overflow-wrap: anywhere; }
  .muted { color: #6b6b70; }
</style>
</head>
<body>
<main>
<h1>Admin token required</h1>
<p>The cache dashboard and the other admin pages of this taskservice need the token the
app was started with (<code>ADMIN_TOKEN</code>).</p>
<p>In a browser, open <code>/admin/?token=&lt;ADMIN_TOKEN&gt;</code> once: the app sets a
cookie for 12 hours and sends you on to <code>/admin/</code>, without the token in the
address.</p>
<p>From a program, send the header <code>Authorization: Bearer &lt;ADMIN_TOKEN&gt;</code>
(also for <code>/admin/dashboard.json</code> and <code>/metrics</code>).</p>
<p class="muted">A token that was not accepted, or a cookie set before the token changed,
leads here too.</p>
</main>
</body>
</html>
`)

var loginCSP = "default-src 'none'; style-src " + inlineHash(loginHTML, "style") +
	"; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// history is how many samples the monitor keeps: the dashboard's window
// is history sampling intervals, 10 minutes at the app's 1 s.
const history = 600

// point is one interval of one cache: what happened in it.
type point struct {
	T            int64   `json:"t"`            // end of the interval, Unix milliseconds
	LocalHits    uint64  `json:"local_hits"`   // Gets the local tier answered with a value
	RedisHits    uint64  `json:"redis_hits"`   // Gets Redis answered with a fresh value
	Stale        uint64  `json:"stale"`        // answers with a value past its TTL
	Negative     uint64  `json:"negative"`     // Gets answered "not found" by a tombstone (either tier)
	Misses       uint64  `json:"misses"`       // Gets whose first read found nothing usable
	Loads        uint64  `json:"loads"`        // loader (database) calls, failed ones included
	LoadMillis   float64 `json:"load_ms"`      // their mean duration
	RedisErrors  uint64  `json:"redis_errors"` // Redis commands sent that failed
	RedisSkipped uint64  `json:"redis_skipped"`
	BusMessages  uint64  `json:"bus_messages"`
}

// series is one cache's history and state.
type series struct {
	Name         string  `json:"name"`
	Breaker      string  `json:"breaker"`
	LocalTier    string  `json:"local_tier"` // live, bypassed, off
	LocalEntries uint64  `json:"local_entries"`
	HitRate      float64 `json:"hit_rate"` // since start: Stats.HitRate
	Points       []point `json:"points"`

	src  cacheprometheus.Source
	last cacheaside.Stats
	hasL bool // the cache has a local tier
}

// monitor samples caches into series.
type monitor struct {
	interval time.Duration
	mu       sync.Mutex
	series   []*series
	stop     chan struct{}
	once     sync.Once
	done     chan struct{}
}

func newMonitor(interval time.Duration) *monitor {
	m := &monitor{interval: interval, stop: make(chan struct{}), done: make(chan struct{})}
	go m.run()
	return m
}

// add starts sampling src under name; hasLocal says it has a local tier.
func (m *monitor) add(name string, src cacheprometheus.Source, hasLocal bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.series = append(m.series, &series{Name: name, src: src, last: src.Stats(), hasL: hasLocal})
}

func (m *monitor) run() {
	defer close(m.done)
	t := time.NewTicker(m.interval)
	defer t.Stop()
	for {
		select {
		case <-m.stop:
			return
		case now := <-t.C:
			m.sample(now)
		}
	}
}

func (m *monitor) close() {
	m.once.Do(func() { close(m.stop) })
	<-m.done
}

func (m *monitor) sample(now time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, s := range m.series {
		cur := s.src.Stats()
		p := delta(s.last, cur)
		p.T = now.UnixMilli()
		s.last = cur
		if len(s.Points) == history {
			copy(s.Points, s.Points[1:])
			s.Points = s.Points[:history-1]
		}
		s.Points = append(s.Points, p)
	}
}

// delta is what happened between two snapshots of one cache.
func delta(a, b cacheaside.Stats) point {
	d := func(x, y uint64) uint64 {
		if y < x {
			return 0
		}
		return y - x
	}
	p := point{
		LocalHits:    d(a.LocalHits, b.LocalHits),
		Stale:        d(a.StaleServed, b.StaleServed),
		Negative:     d(a.NegativeHits, b.NegativeHits),
		Misses:       d(a.Misses, b.Misses),
		Loads:        d(a.Loads+a.LoadErrors, b.Loads+b.LoadErrors),
		RedisErrors:  d(a.RedisErrors, b.RedisErrors),
		RedisSkipped: d(a.RedisSkipped, b.RedisSkipped),
		BusMessages:  d(a.BusMessages, b.BusMessages),
	}
	// Hits counts local hits and stale first reads too.
	hits := d(a.Hits, b.Hits)
	fromRedis := hits - min(hits, p.LocalHits)
	p.RedisHits = fromRedis - min(fromRedis, p.Stale)
	if p.Loads > 0 {
		p.LoadMillis = float64(b.LoadTime-a.LoadTime) / float64(time.Millisecond) / float64(p.Loads)
	}
	return p
}

// dashboardJSON is what the page polls.
type dashboardJSON struct {
	IntervalMillis int64         `json:"interval_ms"` // one point per interval
	WindowMillis   int64         `json:"window_ms"`   // what the monitor keeps: history intervals
	Caches         []*series     `json:"caches"`
	Audits         []auditResult `json:"audits"` // the last staleness audit of each cache that had one
}

// snapshot copies the state of every series, with at most n points each.
func (m *monitor) snapshot(n int) dashboardJSON {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := dashboardJSON{IntervalMillis: m.interval.Milliseconds(), WindowMillis: history * m.interval.Milliseconds(), Caches: []*series{}}
	for _, s := range m.series {
		st := s.src.Stats()
		c := &series{Name: s.Name, Breaker: st.Breaker, LocalTier: "off", LocalEntries: st.LocalEntries, HitRate: st.HitRate()}
		if s.hasL {
			c.LocalTier = "bypassed"
			if st.LocalLive {
				c.LocalTier = "live"
			}
		}
		from := max(0, len(s.Points)-n)
		c.Points = append([]point{}, s.Points[from:]...)
		out.Caches = append(out.Caches, c)
	}
	return out
}

func (a *API) dashboardPage(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/admin/" {
		http.NotFound(w, r)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Content-Security-Policy", dashboardCSP)
	_, _ = w.Write(dashboardHTML)
}

// dashboardData is the monitor's state; ?points=N keeps the last N points
// of each cache (default: the whole window).
func (a *API) dashboardData(w http.ResponseWriter, r *http.Request) {
	n, err := intParam(r.URL.Query().Get("points"), history, 1, history, "points")
	if err != nil {
		a.fail(w, r, err)
		return
	}
	out := a.mon.snapshot(n)
	out.Audits = a.audits.results()
	writeJSON(w, http.StatusOK, out)
}

// loginPage is the answer to a browser without a valid token: how to log
// in, as a page (401). The caller has set no-store, nosniff and
// WWW-Authenticate.
func loginPage(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Content-Security-Policy", loginCSP)
	w.WriteHeader(http.StatusUnauthorized)
	_, _ = w.Write(loginHTML)
}

// adminCookie lets a browser, which cannot send a bearer header when it
// opens /admin/, in: /admin/?token=T sets it and redirects to /admin/
// without the token. It holds an HMAC of the token, not the token, and
// lives 12 hours (HttpOnly, SameSite=Strict, path /; Secure over TLS,
// also behind a proxy that says X-Forwarded-Proto: https).
const adminCookie = "taskservice_admin"

// cookieValue is what the cookie holds for the current ADMIN_TOKEN.
// adminCookieAge is how long a login cookie is honoured: its value carries
// the time it was issued, so a copied cookie stops working.
const adminCookieAge = 12 * time.Hour

// cookieValue is the login cookie issued at t: the time, and an HMAC of it
// keyed by the token (never the token itself).
func (a *API) cookieValue(t time.Time) string {
	issued := strconv.FormatInt(t.Unix(), 10)
	m := hmac.New(sha256.New, []byte(a.adminToken))
	m.Write([]byte("taskservice admin cookie v2 " + issued))
	return issued + "." + hex.EncodeToString(m.Sum(nil))
}

// cookieOK reports whether v is a cookie this token issued, at most
// adminCookieAge ago (and not ahead of this clock by more than a minute).
func (a *API) cookieOK(v string, now time.Time) bool {
	issued, _, ok := strings.Cut(v, ".")
	sec, err := strconv.ParseInt(issued, 10, 64)
	if !ok || err != nil {
		return false
	}
	t := time.Unix(sec, 0)
	if now.Sub(t) > adminCookieAge || t.Sub(now) > time.Minute {
		return false
	}
	return subtle.ConstantTimeCompare([]byte(v), []byte(a.cookieValue(t))) == 1
}

func (a *API) tokenOK(r *http.Request) bool {
	want := []byte("Bearer " + a.adminToken)
	if subtle.ConstantTimeCompare([]byte(r.Header.Get("Authorization")), want) == 1 {
		return true
	}
	c, err := r.Cookie(adminCookie)
	return err == nil && a.cookieOK(c.Value, time.Now())
}

// login turns /admin/?token=T into the cookie.
func (a *API) login(w http.ResponseWriter, r *http.Request) bool {
	tok := r.URL.Query().Get("token")
	if tok == "" || subtle.ConstantTimeCompare([]byte(tok), []byte(a.adminToken)) != 1 {
		return false
	}
	secure := r.TLS != nil || r.Header.Get("X-Forwarded-Proto") == "https"
	http.SetCookie(w, &http.Cookie{Name: adminCookie, Value: a.cookieValue(time.Now()), Path: "/", MaxAge: int(adminCookieAge.Seconds()),
		HttpOnly: true, SameSite: http.SameSiteStrictMode, Secure: secure})
	http.Redirect(w, r, "/admin/", http.StatusSeeOther) // a constant: never a target built from the request
	return true
}
