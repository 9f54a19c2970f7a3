package main

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/seed-b4ec662f/cacheaside"
)

// The staleness audit (lecture 4.4: how stale is the cache, measured, not
// guessed). Cache.Audit samples cached entries, reloads each from the
// database and counts those that differ. GET /admin/audit?cache=task&n=100
// runs one; with AUDIT_EVERY set (a duration, e.g. 1m) the app also runs
// one per cache at that interval. The last result of each cache is on the
// dashboard and in /metrics (taskservice_audit_*). The task cache is
// invalidated on every write, so its audit should find nothing stale;
// org_stats is TTL only, so its audit shows what that TTL costs.

// auditedCaches are the caches an audit can sample: their keys map back
// to a row (a task id, an org name). List pages are left out: a page's key
// is a query, not a row.
var auditedCaches = []string{"task", "org_stats"}

// Audit samples up to n entries of one cache and reloads each from the
// store.
func (s *Service) Audit(ctx context.Context, cache string, n int) (cacheaside.AuditReport, error) {
	switch cache {
	case "task":
		prefix := s.taskKeys.Prefix()
		return s.tasks.Audit(ctx, prefix, n, func(ctx context.Context, key string) (Task, error) {
			id, err := strconv.ParseInt(strings.TrimPrefix(key, prefix), 10, 64)
			if err != nil {
				return Task{}, fmt.Errorf("%q is not a task key", key)
			}
			return s.store.GetTask(ctx, id)
		})
	case "org_stats":
		prefix := s.statsKeys.Prefix()
		return s.stats.Audit(ctx, prefix, n, func(ctx context.Context, key string) (OrgStats, error) {
			org, err := url.PathUnescape(strings.TrimPrefix(key, prefix)) // the inverse of the key's escaping
			if err != nil {
				return OrgStats{}, fmt.Errorf("%q is not an org_stats key", key)
			}
			return s.store.OrgStats(ctx, org)
		})
	}
	return cacheaside.AuditReport{}, errInvalid{fmt.Sprintf("cache must be one of %s", strings.Join(auditedCaches, ", "))}
}

// auditResult is one audit, as the dashboard and the admin endpoint show it.
type auditResult struct {
	Cache             string   `json:"cache"`
	At                int64    `json:"at_ms"` // when it ended, Unix milliseconds
	TookMillis        int64    `json:"took_ms"`
	Sampled           int      `json:"sampled"`
	Stale             int      `json:"stale"`
	Skipped           int      `json:"skipped"`
	OldestStaleMillis int64    `json:"oldest_stale_ms"`
	StaleKeys         []string `json:"stale_keys"`
	Error             string   `json:"error,omitempty"`
}

// auditor runs audits and keeps the last result of each cache.
type auditor struct {
	svc *Service
	n   int // entries per periodic audit

	mu   sync.Mutex
	last map[string]auditResult

	sampled, stale *prometheus.GaugeVec
	oldest         *prometheus.GaugeVec
}

func newAuditor(svc *Service, reg prometheus.Registerer) *auditor {
	a := &auditor{svc: svc, n: 100, last: map[string]auditResult{},
		sampled: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "taskservice_audit_sampled", Help: "Entries the last staleness audit of the cache checked against the database."}, []string{"cache"}),
		stale:   prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "taskservice_audit_stale", Help: "Entries the last staleness audit of the cache found different from the database."}, []string{"cache"}),
		oldest:  prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "taskservice_audit_oldest_stale_seconds", Help: "How long ago the oldest stale entry of the last audit was loaded; 0 with none."}, []string{"cache"}),
	}
	reg.MustRegister(a.sampled, a.stale, a.oldest)
	return a
}

// run audits every cache of auditedCaches once per every until ctx ends.
func (a *auditor) run(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, c := range auditedCaches {
			actx, cancel := context.WithTimeout(ctx, every)
			_ = a.audit(actx, c, a.n)
			cancel()
		}
	}
}

// audit runs one audit of cache and records it.
func (a *auditor) audit(ctx context.Context, cache string, n int) auditResult {
	start := time.Now()
	rep, err := a.svc.Audit(ctx, cache, n)
	res := auditResult{Cache: cache, At: time.Now().UnixMilli(), TookMillis: time.Since(start).Milliseconds(),
		Sampled: rep.Sampled, Stale: rep.Stale, Skipped: rep.Skipped, OldestStaleMillis: rep.OldestStale.Milliseconds(), StaleKeys: rep.StaleKeys}
	if res.StaleKeys == nil {
		res.StaleKeys = []string{}
	}
	if err != nil {
		res.Error = err.Error()
	}
	a.mu.Lock()
	a.last[cache] = res
	a.mu.Unlock()
	a.sampled.WithLabelValues(cache).Set(float64(res.Sampled))
	a.stale.WithLabelValues(cache).Set(float64(res.Stale))
	a.oldest.WithLabelValues(cache).Set(rep.OldestStale.Seconds())
	return res
}

// results are the last audits, in auditedCaches order.
func (a *auditor) results() []auditResult {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := []auditResult{}
	for _, c := range auditedCaches {
		if r, ok := a.last[c]; ok {
			out = append(out, r)
		}
	}
	return out
}

// auditNow is GET /admin/audit?cache=task&n=100: one audit, now (n from 1
// to 10,000, default 100), recorded for the dashboard and /metrics. An
// unknown cache is a 400; an audit that Redis or the database stopped is a
// 503 with what it found so far.
func (api *API) auditNow(w http.ResponseWriter, r *http.Request) {
	n, err := intParam(r.URL.Query().Get("n"), 100, 1, 10000, "n")
	if err != nil {
		api.fail(w, r, err)
		return
	}
	cache := r.URL.Query().Get("cache")
	if !slices.Contains(auditedCaches, cache) {
		api.fail(w, r, errInvalid{fmt.Sprintf("cache must be one of %s", strings.Join(auditedCaches, ", "))})
		return
	}
	res := api.audits.audit(r.Context(), cache, n)
	status := http.StatusOK
	if res.Error != "" {
		status = http.StatusServiceUnavailable
	}
	writeJSON(w, status, res)
}
