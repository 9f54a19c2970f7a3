package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
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
}

// Routes returns the task API's handler. Each route shows one pattern;
// the comment names the lecture section.
func (a *API) Routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /tasks/{id}", a.getTask)                                   // 3.1, 3.3 cache-aside; 5.1 stampede; 5.2 negative caching
	mux.HandleFunc("GET /tasks/batch", a.getTasks)                                 // scale: GetMany, one Redis read and one query for a batch
	mux.HandleFunc("GET /tasks", a.listTasks)                                      // 3.2 key design: every query parameter in the key
	mux.HandleFunc("POST /tasks", a.createTask)                                    // 3.4, 4.3 write, then invalidate
	mux.HandleFunc("PUT /tasks/{id}", a.updateTask)                                // 3.4, 4.3
	mux.HandleFunc("DELETE /tasks/{id}", a.deleteTask)                             // 3.4, 4.3
	mux.HandleFunc("GET /orgs/{org}/stats", a.orgStats)                            // 4.2, 4.4 TTL only
	mux.HandleFunc("GET /users/{id}/permissions", a.perms)                         // 4.4 never cached
	mux.HandleFunc("GET /admin/cache-stats", a.cacheStats)                         // 5.4 monitoring
	mux.Handle("GET /metrics", promhttp.HandlerFor(a.reg, promhttp.HandlerOpts{})) // 5.4 Prometheus
	mux.HandleFunc("GET /healthz", a.healthz)                                      // 5.3 graceful degradation
	return mux
}

type apiError struct {
	Error string `json:"error"`
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func (a *API) fail(w http.ResponseWriter, r *http.Request, err error) {
	var bad errInvalid
	switch {
	case errors.As(err, &bad):
		writeJSON(w, http.StatusBadRequest, apiError{bad.msg})
	case errors.Is(err, cacheaside.ErrNotFound):
		writeJSON(w, http.StatusNotFound, apiError{"not found"})
	case errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded):
		writeJSON(w, http.StatusServiceUnavailable, apiError{"timed out"})
	default:
		a.log.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
		writeJSON(w, http.StatusInternalServerError, apiError{"internal error"})
	}
}

// pathID parses a positive integer path value.
func pathID(r *http.Request, name string) (int64, error) {
	s := r.PathValue(name)
	id, err := strconv.ParseInt(s, 10, 64)
	if err != nil || id <= 0 {
		return 0, invalidf("%s %q is not a positive integer", name, s)
	}
	return id, nil
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
			a.fail(w, r, invalidf("unknown query parameter %q (want ids)", k))
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
			a.fail(w, r, invalidf("ids: %q is not a positive integer", p))
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
		if k != "org" && k != "status" && k != "page" && k != "size" {
			a.fail(w, r, invalidf("unknown query parameter %q (want org, status, page, size)", k))
			return
		}
	}
	org := q.Get("org")
	if org == "" {
		a.fail(w, r, invalidf("org is required"))
		return
	}
	status := q.Get("status")
	if status != "" && !validStatus(status) {
		a.fail(w, r, invalidf("status %q is not one of %v", status, statuses))
		return
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
	p, err := a.svc.ListTasks(r.Context(), org, status, page, size)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, p)
}

func intParam(s string, def, lo, hi int, name string) (int, error) {
	if s == "" {
		return def, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < lo || n > hi {
		return 0, invalidf("%s %q must be an integer from %d to %d", name, s, lo, hi)
	}
	return n, nil
}

// decode reads a JSON body strictly: one object, known fields only, at
// most 64 KiB.
func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, 64<<10))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return invalidf("malformed JSON body: %v", err)
	}
	if dec.More() {
		return invalidf("malformed JSON body: more than one value")
	}
	return nil
}

func (a *API) createTask(w http.ResponseWriter, r *http.Request) {
	var in TaskInput
	if err := decode(r, &in); err != nil {
		a.fail(w, r, err)
		return
	}
	if err := in.validate(true); err != nil {
		a.fail(w, r, err)
		return
	}
	t, err := a.svc.CreateTask(r.Context(), in)
	if err != nil {
		a.fail(w, r, err)
		return
	}
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
	if err := decode(r, &in); err != nil {
		a.fail(w, r, err)
		return
	}
	if err := in.validate(false); err != nil {
		a.fail(w, r, err)
		return
	}
	t, err := a.svc.UpdateTask(r.Context(), id, in)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, t)
}

func (a *API) deleteTask(w http.ResponseWriter, r *http.Request) {
	id, err := pathID(r, "id")
	if err != nil {
		a.fail(w, r, err)
		return
	}
	if err := a.svc.DeleteTask(r.Context(), id); err != nil {
		a.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (a *API) orgStats(w http.ResponseWriter, r *http.Request) {
	st, err := a.svc.OrgStats(r.Context(), r.PathValue("org"))
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
			Hits: s.Hits, NegativeHits: s.NegativeHits, Misses: s.Misses, Total: s.Requests(),
			HitRate: fmt.Sprintf("%.1f%%", 100*s.HitRate()), NegHitRate: fmt.Sprintf("%.1f%%", 100*s.NegativeHitRate()), Loads: s.Loads, StaleServed: s.StaleServed, RedisErrors: s.RedisErrors,
		}
	}
	writeJSON(w, http.StatusOK, out)
}

// healthz reports the database and Redis. Redis down is "degraded", not an
// outage: every endpoint keeps answering from the database (lecture 5.3).
func (a *API) healthz(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 500*time.Millisecond)
	defer cancel()
	res := map[string]string{"status": "ok", "database": "up", "redis": "up"}
	code := http.StatusOK
	if err := a.rdb.Ping(ctx).Err(); err != nil {
		res["redis"], res["status"] = "down: "+err.Error(), "degraded"
	}
	if err := a.store.Ping(ctx); err != nil {
		res["database"], res["status"] = "down: "+err.Error(), "down"
		code = http.StatusServiceUnavailable
	}
	writeJSON(w, code, res)
}
