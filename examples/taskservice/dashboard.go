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
	"sync"
	"time"

	"github.com/seed-b4ec662f/cacheaside"
	"github.com/seed-b4ec662f/cacheaside/extra/cacheprometheus"
)

// The live dashboard (lecture 5.4, "know whether the cache helps"): a
// monitor samples every cache's Stats once per interval and keeps the last
// minutes of per-interval changes; /admin/ is one embedded page that draws
// them, and /admin/dashboard.json is what it polls every second. Nothing is
// fetched from elsewhere at run time.

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
	hash := func(tag string) string {
		m := regexp.MustCompile(`(?s)<` + tag + `>(.*?)</` + tag + `>`).FindSubmatch(b)
		if m == nil {
			panic("dashboard: no <" + tag + "> in index.html")
		}
		sum := sha256.Sum256(m[1])
		return "'sha256-" + base64.StdEncoding.EncodeToString(sum[:]) + "'"
	}
	return b, "default-src 'none'; script-src " + hash("script") + "; style-src " + hash("style") +
		"; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
}()

// history is how many samples the monitor keeps: 10 minutes at 1 s.
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
	IntervalMillis int64     `json:"interval_ms"`
	Caches         []*series `json:"caches"`
}

// snapshot copies the state of every series, with at most n points each.
func (m *monitor) snapshot(n int) dashboardJSON {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := dashboardJSON{IntervalMillis: m.interval.Milliseconds(), Caches: []*series{}}
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

func (a *API) dashboardData(w http.ResponseWriter, r *http.Request) {
	n, err := intParam(r.URL.Query().Get("points"), 300, 1, history, "points")
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, a.mon.snapshot(n))
}

// adminCookie lets a browser, which cannot send a bearer header when it
// opens /admin/, in: /admin/?token=T sets it and redirects to /admin/
// without the token. It holds an HMAC of the token, not the token, and
// lives 12 hours (HttpOnly, SameSite=Strict, path /; Secure over TLS,
// also behind a proxy that says X-Forwarded-Proto: https).
const adminCookie = "taskservice_admin"

// cookieValue is what the cookie holds for the current ADMIN_TOKEN.
func (a *API) cookieValue() string {
	m := hmac.New(sha256.New, []byte(a.adminToken))
	m.Write([]byte("taskservice admin cookie v1"))
	return hex.EncodeToString(m.Sum(nil))
}

func (a *API) tokenOK(r *http.Request) bool {
	want := []byte("Bearer " + a.adminToken)
	if subtle.ConstantTimeCompare([]byte(r.Header.Get("Authorization")), want) == 1 {
		return true
	}
	c, err := r.Cookie(adminCookie)
	return err == nil && subtle.ConstantTimeCompare([]byte(c.Value), []byte(a.cookieValue())) == 1
}

// login turns /admin/?token=T into the cookie.
func (a *API) login(w http.ResponseWriter, r *http.Request) bool {
	tok := r.URL.Query().Get("token")
	if tok == "" || subtle.ConstantTimeCompare([]byte(tok), []byte(a.adminToken)) != 1 {
		return false
	}
	secure := r.TLS != nil || r.Header.Get("X-Forwarded-Proto") == "https"
	http.SetCookie(w, &http.Cookie{Name: adminCookie, Value: a.cookieValue(), Path: "/", MaxAge: 12 * 3600,
		HttpOnly: true, SameSite: http.SameSiteStrictMode, Secure: secure})
	http.Redirect(w, r, "/admin/", http.StatusSeeOther) // a constant: never a target built from the request
	return true
}
