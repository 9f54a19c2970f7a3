package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside"
)

// API is the HTTP layer: routing, input validation, JSON.
type API struct {
	svc   *Service
	store *Store
	rdb   redis.UniversalClient
	reg   *prometheus.Registry
	log   *slog.Logger

	adminToken string   // "": /admin/* and /metrics answer loopback clients only (development)
	mon        *monitor // the dashboard's samples
	audits     *auditor // the staleness audits' last results
}

// Routes returns the task API's handler. Each route shows one pattern;
// the comment names the lecture section.
func (a *API) Routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /tasks/{id}", a.getTask)                                        // 3.1, 3.3 cache-aside; 5.1 stampede; 5.2 negative caching
	mux.HandleFunc("GET /tasks/batch", a.getTasks)                                      // scale: GetMany, one Redis read and one query for a batch
	mux.HandleFunc("GET /tasks", a.listTasks)                                           // 3.2 key design: every query parameter in the key
	mux.HandleFunc("POST /tasks", a.createTask)                                         // 3.4, 4.3 write, then invalidate
	mux.HandleFunc("PUT /tasks/{id}", a.updateTask)                                     // 3.4, 4.3
	mux.HandleFunc("DELETE /tasks/{id}", a.deleteTask)                                  // 3.4, 4.3
	mux.HandleFunc("GET /orgs/{org}/stats", a.orgStats)                                 // 4.2, 4.4 TTL only
	mux.HandleFunc("GET /users/{id}/permissions", a.perms)                              // 4.4 never cached
	mux.Handle("GET /admin/", a.adminPage(http.HandlerFunc(a.dashboardPage)))           // 5.4, live: the dashboard
	mux.Handle("GET /admin/dashboard.json", a.admin(http.HandlerFunc(a.dashboardData))) // what it polls
	mux.Handle("GET /admin/cache-stats", a.admin(http.HandlerFunc(a.cacheStats)))
	mux.Handle("GET /admin/audit", a.admin(http.HandlerFunc(a.auditNow)))                                  // 4.4 how stale the cache is, measured
	mux.Handle("DELETE /admin/cache/{cache}", a.admin(http.HandlerFunc(a.purge)))                          // 4.3 pattern invalidation: InvalidatePrefix
	mux.Handle("POST /admin/orgs/{org}/lists/invalidate", a.admin(http.HandlerFunc(a.invalidateOrgLists))) // 4.3 the namespace bump instead           // 5.4 monitoring
	mux.Handle("GET /metrics", a.admin(promhttp.HandlerFor(a.reg, promhttp.HandlerOpts{})))                // 5.4 Prometheus
	mux.HandleFunc("GET /healthz", a.healthz)                                                              // 5.3 graceful degradation
	return mux
}

// admin guards operator endpoints: with ADMIN_TOKEN set, a request needs
// "Authorization: Bearer <token>" or the cookie /admin/?token=<token> sets
// for a browser, compared in constant time; without it (development) they
// answer clients on loopback only, and refuse others with 403. A request
// without the token gets a JSON 401. A state-changing request (POST,
// DELETE) must come from the app's own origin or from no browser at all:
// net/http's CrossOriginProtection refuses it when Sec-Fetch-Site or
// Origin says another site (a page on another port of the same host
// included, which SameSite=Strict lets the cookie reach).
func (a *API) admin(h http.Handler) http.Handler { return a.guard(h, false) }

// adminPage guards a page as admin does, but a browser without the token
// (its Accept header prefers text/html) gets a 401 page that says how to
// log in instead of the JSON.
func (a *API) adminPage(h http.Handler) http.Handler { return a.guard(h, true) }

// crossOrigin refuses cross-origin state-changing requests (GET, HEAD and
// OPTIONS pass).
var crossOrigin = http.NewCrossOriginProtection()

func (a *API) guard(h http.Handler, page bool) http.Handler {
	return crossOrigin.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "no-store")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		if a.adminToken == "" {
			if !fromLoopback(r) {
				writeJSON(w, http.StatusForbidden, apiError{"admin routes answer loopback clients only while ADMIN_TOKEN is not set"})
				return
			}
			h.ServeHTTP(w, r)
			return
		}
		if !a.tokenOK(r) {
			if r.Method == http.MethodGet && a.login(w, r) {
				return
			}
			w.Header().Set("WWW-Authenticate", `Bearer realm="taskservice admin"`)
			if page {
				w.Header().Add("Vary", "Accept")
				if prefersHTML(r.Header.Get("Accept")) {
					loginPage(w)
					return
				}
			}
			writeJSON(w, http.StatusUnauthorized, apiError{"admin token required: Authorization: Bearer <ADMIN_TOKEN> (a browser: open /admin/?token=<ADMIN_TOKEN> once)"})
			return
		}
		h.ServeHTTP(w, r)
	}))
}

// fromLoopback reports whether the request's peer is on loopback. Behind a
// reverse proxy on the same host every request is; set ADMIN_TOKEN there.
func fromLoopback(r *http.Request) bool {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return false
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// prefersHTML says whether an Accept header ranks text/html above
// application/json: a browser opening a page does, fetch, curl ("*/*")
// and API clients do not.
func prefersHTML(accept string) bool {
	html := acceptQ(accept, "text", "html")
	return html > 0 && html > acceptQ(accept, "application", "json")
}

// acceptQ is the quality an Accept header gives the media type typ/sub:
// that of the most specific range that matches it (RFC 9110, 12.5.1), 0
// when none does or the header is empty. Type names compare without case;
// a malformed q makes its range count as 0.
func acceptQ(accept, typ, sub string) float64 {
	best, q := 0, 0.0
	for rng := range strings.SplitSeq(accept, ",") {
		params := strings.Split(rng, ";")
		t, s, ok := strings.Cut(strings.TrimSpace(params[0]), "/")
		if !ok {
			continue
		}
		spec := 0
		switch {
		case strings.EqualFold(t, typ) && strings.EqualFold(s, sub):
			spec = 3
		case strings.EqualFold(t, typ) && s == "*":
			spec = 2
		case t == "*" && s == "*":
			spec = 1
		}
		if spec <= best {
			continue
		}
		v := 1.0
		for _, p := range params[1:] {
			k, val, _ := strings.Cut(strings.TrimSpace(p), "=")
			if strings.EqualFold(strings.TrimSpace(k), "q") {
				f, err := strconv.ParseFloat(strings.TrimSpace(val), 64)
				if err != nil || !(f >= 0 && f <= 1) { // NaN too
					f = 0
				}
				v = f
			}
		}
		best, q = spec, v
	}
	return q
}

type apiError struct {
	Error string `json:"error"`
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

// fail maps every error a handler meets to a status, the same way on
// every endpoint: bad input 400 (413 for a body too large), absent 404,
// the cache's overload and a Redis that FailClosed refused 503 with
// Retry-After, time-outs 503, anything else 500 (logged; the client sees
// no detail).
func (a *API) fail(w http.ResponseWriter, r *http.Request, err error) {
	var bad errInvalid
	var tooBig *http.MaxBytesError
	switch {
	case errors.As(err, &tooBig):
		writeJSON(w, http.StatusRequestEntityTooLarge, apiError{fmt.Sprintf("request body larger than %d bytes", tooBig.Limit)})
	case errors.As(err, &bad):
		writeJSON(w, http.StatusBadRequest, apiError{bad.msg})
	case errors.Is(err, cacheaside.ErrInvalidKey):
		// Input that passed the field checks but makes no valid cache key
		// (too long once escaped, say): still the client's input.
		writeJSON(w, http.StatusBadRequest, apiError{"input too long or malformed"})
	case errors.Is(err, cacheaside.ErrNotFound):
		writeJSON(w, http.StatusNotFound, apiError{"not found"})
	case errors.Is(err, cacheaside.ErrOverloaded), errors.Is(err, cacheaside.ErrRedisUnavailable):
		w.Header().Set("Retry-After", "1")
		writeJSON(w, http.StatusServiceUnavailable, apiError{"temporarily overloaded, retry shortly"})
	case errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded):
		writeJSON(w, http.StatusServiceUnavailable, apiError{"timed out"})
	default:
		a.log.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
		writeJSON(w, http.StatusInternalServerError, apiError{"internal error"})
	}
}

func (a *API) getTask(w http.ResponseWriter, r *http.Request) {
	id, err := pathID(r, "id")
	if err != nil {
		a.fail(w, r, err)
		return
	}
	t, err := a.svc.GetTask(r.Context(), id)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, t)
}

// maxBatch is the most ids GET /tasks/batch accepts.
const maxBatch = 100

// TaskBatch is the answer of GET /tasks/batch: the tasks found, in the
// order asked, and the ids that do not exist.
type TaskBatch struct {
	Tasks   []Task  `json:"tasks"`
	Missing []int64 `json:"missing"`
}

func (a *API) getTasks(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	for k := range q {
		if k != "ids" {
			a.fail(w, r, invalidf("unknown query parameter %s (want ids)", short(k)))
			return
		}
	}
	parts := strings.Split(q.Get("ids"), ",")
	if len(parts) > maxBatch {
		a.fail(w, r, invalidf("%d ids, at most %d", len(parts), maxBatch))
		return
	}
	ids := make([]int64, 0, len(parts))
	for _, p := range parts {
		id, err := strconv.ParseInt(strings.TrimSpace(p), 10, 64)
		if err != nil || id <= 0 {
			a.fail(w, r, invalidf("ids: %s is not a positive integer", short(p)))
			return
		}
		ids = append(ids, id)
	}
	found, err := a.svc.GetTasks(r.Context(), ids)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	out := TaskBatch{Tasks: []Task{}, Missing: []int64{}}
	seen := map[int64]bool{}
	for _, id := range ids {
		if seen[id] {
			continue
		}
		seen[id] = true
		if t, ok := found[id]; ok {
			out.Tasks = append(out.Tasks, t)
		} else {
			out.Missing = append(out.Missing, id)
		}
	}
	writeJSON(w, http.StatusOK, out)
}

// Page sizes the list endpoint accepts.
const (
	defaultPageSize = 20
	maxPageSize     = 100
)

func (a *API) listTasks(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	for k := range q {
		if k != "org" && k != "assignee" && k != "status" && k != "page" && k != "size" {
			a.fail(w, r, invalidf("unknown query parameter %s (want org, assignee, status, page, size)", short(k)))
			return
		}
	}
	org := q.Get("org")
	if err := checkOrg(org); err != nil {
		a.fail(w, r, err)
		return
	}
	status := q.Get("status")
	if status != "" && !validStatus(status) {
		a.fail(w, r, invalidf("status %s is not one of %s", short(status), strings.Join(statuses, ", ")))
		return
	}
	var assignee int64
	if s := q.Get("assignee"); s != "" {
		id, err := strconv.ParseInt(s, 10, 64)
		if err != nil || id <= 0 {
			a.fail(w, r, invalidf("assignee %s is not a positive integer", short(s)))
			return
		}
		assignee = id
	}
	page, err := intParam(q.Get("page"), 1, 1, 10000, "page")
	if err != nil {
		a.fail(w, r, err)
		return
	}
	size, err := intParam(q.Get("size"), defaultPageSize, 1, maxPageSize, "size")
	if err != nil {
		a.fail(w, r, err)
		return
	}
	p, err := a.svc.ListTasks(r.Context(), org, assignee, status, page, size)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, p)
}

func (a *API) createTask(w http.ResponseWriter, r *http.Request) {
	var in TaskInput
	if err := decode(w, r, &in); err != nil {
		a.fail(w, r, err)
		return
	}
	if err := in.validate(true); err != nil {
		a.fail(w, r, err)
		return
	}
	t, queued, err := a.svc.CreateTask(r.Context(), in)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	invalidationHeader(w, queued)
	w.Header().Set("Location", fmt.Sprintf("/tasks/%d", t.ID))
	writeJSON(w, http.StatusCreated, t)
}

func (a *API) updateTask(w http.ResponseWriter, r *http.Request) {
	id, err := pathID(r, "id")
	if err != nil {
		a.fail(w, r, err)
		return
	}
	var in TaskInput
	if err := decode(w, r, &in); err != nil {
		a.fail(w, r, err)
		return
	}
	if err := in.validate(false); err != nil {
		a.fail(w, r, err)
		return
	}
	t, queued, err := a.svc.UpdateTask(r.Context(), id, in)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	invalidationHeader(w, queued)
	writeJSON(w, http.StatusOK, t)
}

// invalidationHeader tells the client of a committed write whose cache
// invalidation was queued for retry (see Service's writes): the write
// stands; other instances may serve the old version until the retry lands.
func invalidationHeader(w http.ResponseWriter, queued bool) {
	if queued {
		w.Header().Set("Cache-Invalidation", "queued")
	}
}

func (a *API) deleteTask(w http.ResponseWriter, r *http.Request) {
	id, err := pathID(r, "id")
	if err != nil {
		a.fail(w, r, err)
		return
	}
	queued, err := a.svc.DeleteTask(r.Context(), id)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	invalidationHeader(w, queued)
	w.WriteHeader(http.StatusNoContent)
}

func (a *API) orgStats(w http.ResponseWriter, r *http.Request) {
	org := r.PathValue("org")
	if err := checkOrg(org); err != nil {
		a.fail(w, r, err)
		return
	}
	st, err := a.svc.OrgStats(r.Context(), org)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

func (a *API) perms(w http.ResponseWriter, r *http.Request) {
	id, err := pathID(r, "id")
	if err != nil {
		a.fail(w, r, err)
		return
	}
	p, err := a.svc.Permissions(r.Context(), id)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, p)
}

// cacheStat is one cache's line of /admin/cache-stats, as in the lecture.
type cacheStat struct {
	Hits         uint64 `json:"hits"`
	NegativeHits uint64 `json:"negative_hits"`
	Misses       uint64 `json:"misses"`
	Total        uint64 `json:"total"`
	HitRate      string `json:"hit_rate"`          // hits / total: found in the cache
	NegHitRate   string `json:"negative_hit_rate"` // negative hits / total: "not found" answered by the cache
	Loads        uint64 `json:"db_loads"`
	StaleServed  uint64 `json:"stale_served"`
	RedisErrors  uint64 `json:"redis_errors"`
}

func (a *API) cacheStats(w http.ResponseWriter, r *http.Request) {
	out := map[string]cacheStat{}
	for _, c := range a.svc.Caches() {
		s := c.Stats()
		out[c.Name()] = cacheStat{
			Hits: s.Hits, NegativeHits: s.NegativeHits, Misses: s.Misses, Total: s.Hits + s.NegativeHits + s.Misses,
			HitRate: fmt.Sprintf("%.1f%%", 100*s.HitRate()), NegHitRate: fmt.Sprintf("%.1f%%", 100*s.NegativeHitRate()), Loads: s.Loads, StaleServed: s.StaleServed, RedisErrors: s.RedisErrors,
		}
	}
	writeJSON(w, http.StatusOK, out)
}

// health is /healthz's answer: states only. Error strings (addresses,
// driver messages) go to the log at debug level, not to whoever asks.
type health struct {
	Status    string `json:"status"`     // ok, degraded (Redis down: answers come from the database), down (the database is)
	Database  string `json:"database"`   // up, down
	Redis     string `json:"redis"`      // up, down
	Breaker   string `json:"breaker"`    // the task cache's circuit breaker: closed, open, half-open
	LocalTier string `json:"local_tier"` // live, bypassed (its invalidation bus is not confirmed), refused (the Redis server refuses pub/sub), off
}

// ended is a context that has ended: WaitLocal with it reads the local
// tier's state without waiting.
var ended = func() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}()

// healthz reports the database and Redis. Redis down is "degraded", not an
// outage: every endpoint keeps answering from the database (lecture 5.3).
func (a *API) healthz(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 500*time.Millisecond)
	defer cancel()
	h := health{Status: "ok", Database: "up", Redis: "up", LocalTier: "off"}
	code := http.StatusOK
	if err := a.rdb.Ping(ctx).Err(); err != nil {
		h.Redis, h.Status = "down", "degraded"
		a.log.Debug("healthz: Redis", "err", err)
	}
	if err := a.store.Ping(ctx); err != nil {
		h.Database, h.Status = "down", "down"
		code = http.StatusServiceUnavailable
		a.log.Debug("healthz: database", "err", err)
	}
	st := a.svc.tasks.Stats()
	h.Breaker = st.Breaker
	if a.svc.localTier {
		h.LocalTier = "bypassed"
		if st.LocalLive {
			h.LocalTier = "live"
		} else if errors.Is(a.svc.tasks.WaitLocal(ended), cacheaside.ErrNoPubSub) {
			h.LocalTier = "refused"
		}
	}
	writeJSON(w, code, h)
}
