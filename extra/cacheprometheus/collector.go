// Package cacheprometheus exports the counters of cacheaside caches to
// Prometheus.
//
// A Collector reads Cache.Stats of each cache it was given at scrape time,
// so it costs the request path nothing: the cache counts as it always
// does, and a scrape sums its counters once. Every series carries one
// label, cache (Options.Name), and never a key, so the number of series is
// fixed: 50 per cache (17 of them the load-time histogram's). Every
// counter cacheaside.Stats.Counters lists is exported, so a counter added
// to cacheaside reaches Prometheus without a change here.
//
//	tasks, _ := cacheaside.New[Task](rdb, &cacheaside.Options[Task]{Name: "tasks"})
//	users, _ := cacheaside.New[User](rdb, &cacheaside.Options[User]{Name: "users"})
//	prometheus.MustRegister(cacheprometheus.NewCollector("", tasks, users))
//	http.Handle("/metrics", promhttp.Handler())
//
// What it exports, with the namespace "cacheaside" (the default):
//
//   - cacheaside_requests_total{cache, result}: Gets by the outcome of the
//     first read: result="hit" (a value, from Redis or the local tier),
//     "negative_hit" (a "not found" tombstone) or "miss". A GetMany counts
//     once per distinct key. The hit rate is
//     rate(requests_total{result="hit"}) / rate(requests_total).
//   - cacheaside_local_hits_total, cacheaside_local_negative_hits_total:
//     the parts of the hits and negative hits the local tier answered.
//   - cacheaside_loads_total{cache, result}: loader calls, result="ok"
//     (a value or "not found") or "error" (errors, panics, timeouts);
//     cacheaside_load_duration_seconds: their durations, a histogram with
//     buckets from 1ms to 30s (cacheaside.Stats.LoadsWithin).
//   - one counter per other counter of cacheaside.Stats.Counters, named
//     cacheaside_<name>_total with the name's dots as underscores:
//     coalesced Gets, keys that waited for another holder's lease,
//     rejected fills, values not cached, decode errors, Redis commands
//     failed and skipped, stale answers, refreshes, invalidated keys,
//     namespace bumps, breaker openings, overloaded Gets, invalidations
//     queued, retried and dropped, local-tier flushes and bus messages
//     (see Describe, or the HELP lines of a scrape).
//   - gauges: cacheaside_invalidations_pending, cacheaside_breaker_state
//     {state} (1 for the current state of "closed", "open", "half-open",
//     0 for the others; all 0 when the breaker is disabled),
//     cacheaside_local_live (1 while the local tier is in use),
//     cacheaside_local_entries and cacheaside_read_budget_seconds (the
//     budget a Redis read gets now, which follows Redis's latency).
//
// The module is separate from the cacheaside module, as go-redis keeps
// redisprometheus under extra/, so a cache that does not export to
// Prometheus does not depend on its client library.
package cacheprometheus

import (
	"fmt"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/seed-b4ec662f/cacheaside"
)

// Source is a cache the Collector reads: any *cacheaside.Cache[T].
type Source interface {
	Name() string
	Stats() cacheaside.Stats
}

// breakerStates are the values of breaker_state's state label.
var breakerStates = []string{"closed", "open", "half-open"}

// Collector is a prometheus.Collector of any number of caches. It is safe
// for concurrent use; Add may be called while it is registered.
type Collector struct {
	loadTime                                              *prometheus.Desc
	pending, breaker, localLive, localEntries, readBudget *prometheus.Desc
	counters                                              map[string]*prometheus.Desc // by Counter.Name
	mu                                                    sync.RWMutex
	caches                                                []Source
	names                                                 map[string]bool
}

var _ prometheus.Collector = (*Collector)(nil)

// NewCollector returns a Collector of caches, with metric names under
// namespace ("" means "cacheaside"). Like prometheus.MustRegister, it
// panics if two caches share a name, as their series would collide; Add
// returns that as an error instead.
func NewCollector(namespace string, caches ...Source) *Collector {
	if namespace == "" {
		namespace = "cacheaside"
	}
	desc := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(namespace, "", name), help, append([]string{"cache"}, labels...), nil)
	}
	c := &Collector{
		loadTime:     desc("load_duration_seconds", "Time spent in each loader call."),
		pending:      desc("invalidations_pending", "Failed invalidations still waiting for a retry; this process loads their keys from the source meanwhile."),
		breaker:      desc("breaker_state", "The Redis circuit breaker's state: 1 for the current one. All 0 when the breaker is disabled.", "state"),
		localLive:    desc("local_live", "1 while the local tier is in use (its invalidation bus is confirmed), else 0."),
		localEntries: desc("local_entries", "Entries the local tier holds (an estimate)."),
		readBudget:   desc("read_budget_seconds", "The budget a Redis read gets now: Degradation.OpTimeout, or more while Redis answers slowly (up to MaxOpTimeout)."),
		names:        map[string]bool{},
		counters:     map[string]*prometheus.Desc{},
	}
	// Every counter cacheaside lists, whatever it adds: a family (the
	// members share a Name) gets a result label.
	for _, k := range (cacheaside.Stats{}).Counters() {
		if _, ok := c.counters[k.Name]; ok {
			continue
		}
		var labels []string
		if k.Result != "" {
			labels = []string{"result"}
		}
		c.counters[k.Name] = desc(metricName(k.Name), k.Help, labels...)
	}
	if err := c.Add(caches...); err != nil {
		panic(err)
	}
	return c
}

// Add adds caches to the collector. It returns an error, and adds none of
// them, if a name is already collected or appears twice.
func (c *Collector) Add(caches ...Source) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	seen := map[string]bool{}
	for _, s := range caches {
		if s == nil {
			return fmt.Errorf("cacheprometheus: nil cache")
		}
		if n := s.Name(); c.names[n] || seen[n] {
			return fmt.Errorf("cacheprometheus: two caches named %q: give each an Options.Name of its own", n)
		} else {
			seen[n] = true
		}
	}
	for _, s := range caches {
		c.names[s.Name()] = true
		c.caches = append(c.caches, s)
	}
	return nil
}

// Remove stops collecting the cache named name (closed, say, or about to
// be replaced by a new cache of that name) and reports whether it was
// collected.
func (c *Collector) Remove(name string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.names[name] {
		return false
	}
	delete(c.names, name)
	kept := make([]Source, 0, len(c.caches)-1)
	for _, s := range c.caches {
		if s.Name() != name {
			kept = append(kept, s)
		}
	}
	c.caches = kept
	return true
}

// Describe sends the descriptors of every metric the collector exports.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.loadTime, c.pending, c.breaker, c.localLive, c.localEntries, c.readBudget} {
		ch <- d
	}
	for _, d := range c.counters {
		ch <- d
	}
}

// Collect reads each cache's Stats once and sends its metrics.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	c.mu.RLock()
	caches := c.caches
	c.mu.RUnlock()
	for _, src := range caches {
		s := src.Stats()
		name := src.Name()
		count := func(d *prometheus.Desc, v uint64, labels ...string) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), append([]string{name}, labels...)...)
		}
		gauge := func(d *prometheus.Desc, v float64, labels ...string) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, append([]string{name}, labels...)...)
		}
		for _, k := range s.Counters() {
			if k.Result != "" {
				count(c.counters[k.Name], k.Value, k.Result)
			} else {
				count(c.counters[k.Name], k.Value)
			}
		}
		buckets := make(map[float64]uint64, len(s.LoadsWithin))
		total := s.Loads + s.LoadErrors
		for _, b := range s.LoadsWithin {
			buckets[b.Le.Seconds()] = b.Count
			// Stats sums its counters one after another while loads go
			// on: a bucket may be a load ahead of the count.
			total = max(total, b.Count)
		}
		ch <- prometheus.MustNewConstHistogram(c.loadTime, total, s.LoadTime.Seconds(), buckets, name)
		gauge(c.pending, float64(s.PendingInvals))
		for _, st := range breakerStates {
			gauge(c.breaker, b2f(s.Breaker == st), st)
		}
		gauge(c.localLive, b2f(s.LocalLive))
		gauge(c.localEntries, float64(s.LocalEntries))
		gauge(c.readBudget, s.ReadBudget.Seconds())
	}
}

// metricName is a counter's Prometheus name: dots become underscores, and
// counters end in _total.
func metricName(name string) string { return strings.ReplaceAll(name, ".", "_") + "_total" }

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
