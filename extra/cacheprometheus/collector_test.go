package cacheprometheus

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http/httptest"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside"
)

// fixed is a Source with given Stats.
type fixed struct {
	name string
	s    cacheaside.Stats
}

func (f fixed) Name() string            { return f.name }
func (f fixed) Stats() cacheaside.Stats { return f.s }

// series names where each Stats field is exported, with the labels that
// pick its series (besides cache).
var exported = map[string]struct {
	metric string
	labels map[string]string
}{
	"Hits":          {"cacheaside_requests_total", map[string]string{"result": "hit"}},
	"NegativeHits":  {"cacheaside_requests_total", map[string]string{"result": "negative_hit"}},
	"Misses":        {"cacheaside_requests_total", map[string]string{"result": "miss"}},
	"Loads":         {"cacheaside_loads_total", map[string]string{"result": "ok"}},
	"LoadErrors":    {"cacheaside_loads_total", map[string]string{"result": "error"}},
	"LoadTime":      {"cacheaside_load_duration_seconds", nil},
	"LoadsWithin":   {"cacheaside_load_duration_seconds", nil},
	"PendingInvals": {"cacheaside_invalidations_pending", nil},
	"Breaker":       {"cacheaside_breaker_state", nil},
	"LocalLive":     {"cacheaside_local_live", nil},
	"LocalEntries":  {"cacheaside_local_entries", nil},
	"ReadBudget":    {"cacheaside_read_budget_seconds", nil},
}

// Every Stats field is exported, each counter under its own value.
func TestEveryStatsField(t *testing.T) {
	var s cacheaside.Stats
	v := reflect.ValueOf(&s).Elem()
	want := map[string]float64{} // metric name → value, for the one-to-one counters
	for i := range v.NumField() {
		f := v.Type().Field(i)
		if f.Type.Kind() == reflect.Uint64 {
			v.Field(i).SetUint(uint64(1000 + i))
		}
		if _, ok := exported[f.Name]; ok {
			continue
		}
		found := false
		for _, k := range s.Counters() {
			if k.Value == uint64(1000+i) && k.Result == "" {
				want["cacheaside_"+metricName(k.Name)] = float64(1000 + i)
				found = true
			}
		}
		if !found {
			t.Errorf("Stats.%s is not exported", f.Name)
		}
	}
	s.LoadTime = 1500 * time.Millisecond
	s.Loads, s.LoadErrors = 3, 1
	s.LoadsWithin = (cacheaside.Stats{}).LoadsWithin
	for i := range 14 {
		s.LoadsWithin = append(s.LoadsWithin, cacheaside.LoadBucket{Le: time.Millisecond << i, Count: min(uint64(i), 4)})
	}
	s.Breaker, s.LocalLive = "half-open", true
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(NewCollector("", fixed{"tasks", s}))
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]*dto.MetricFamily{}
	for _, mf := range mfs {
		got[mf.GetName()] = mf
		if mf.GetHelp() == "" {
			t.Errorf("%s has no HELP", mf.GetName())
		}
		if mf.GetType() == dto.MetricType_COUNTER && !strings.HasSuffix(mf.GetName(), "_total") {
			t.Errorf("counter %s does not end in _total", mf.GetName())
		}
	}
	for name, val := range want {
		mf := got[name]
		if mf == nil || mf.GetMetric()[0].GetCounter().GetValue() != val {
			t.Errorf("%s = %v, want %v", name, mf, val)
		}
	}
	value := func(name string, labels map[string]string) float64 {
		for _, m := range got[name].GetMetric() {
			ok := true
			for _, lp := range m.GetLabel() {
				if w, has := labels[lp.GetName()]; has && w != lp.GetValue() || lp.GetName() == "cache" && lp.GetValue() != "tasks" {
					ok = false
				}
			}
			if ok {
				if m.GetCounter() != nil {
					return m.GetCounter().GetValue()
				}
				return m.GetGauge().GetValue()
			}
		}
		t.Fatalf("no %s%v", name, labels)
		return 0
	}
	for _, f := range []string{"Hits", "NegativeHits", "Misses"} {
		e := exported[f]
		if x := value(e.metric, e.labels); x != float64(reflect.ValueOf(s).FieldByName(f).Uint()) {
			t.Errorf("%s: %v", f, x)
		}
	}
	if value("cacheaside_loads_total", map[string]string{"result": "ok"}) != 3 || value("cacheaside_loads_total", map[string]string{"result": "error"}) != 1 {
		t.Error("loads_total")
	}
	h := got["cacheaside_load_duration_seconds"].GetMetric()[0].GetHistogram()
	if h.GetSampleCount() != 4 || h.GetSampleSum() != 1.5 || len(h.GetBucket()) != 14 ||
		h.GetBucket()[0].GetUpperBound() != 0.001 || h.GetBucket()[2].GetCumulativeCount() != 2 {
		t.Errorf("histogram %v", h)
	}
	if value("cacheaside_breaker_state", map[string]string{"state": "half-open"}) != 1 || value("cacheaside_breaker_state", map[string]string{"state": "open"}) != 0 {
		t.Error("breaker_state")
	}
	if value("cacheaside_local_live", nil) != 1 || value("cacheaside_invalidations_pending", nil) != float64(s.PendingInvals) || value("cacheaside_local_entries", nil) != float64(s.LocalEntries) ||
		value("cacheaside_read_budget_seconds", nil) != s.ReadBudget.Seconds() {
		t.Error("gauges")
	}
	if n := testutil.CollectAndCount(NewCollector("", fixed{"a", s}, fixed{"b", s})); n != 2*(len((cacheaside.Stats{}).Counters())+1+1+3+1+1+1) {
		t.Errorf("%d series for 2 caches", n)
	}
}

func TestDuplicateNames(t *testing.T) {
	c := NewCollector("app", fixed{name: "a"})
	if err := c.Add(fixed{name: "b"}, fixed{name: "a"}); err == nil {
		t.Fatal("a second cache named a was accepted")
	}
	if err := c.Add(fixed{name: "b"}); err != nil {
		t.Fatal(err)
	}
	if n := testutil.CollectAndCount(c, "app_requests_total"); n != 6 {
		t.Fatalf("%d request series, want 3 results × 2 caches", n)
	}
	if !c.Remove("a") || c.Remove("a") {
		t.Fatal("Remove")
	}
	if n := testutil.CollectAndCount(c, "app_requests_total"); n != 3 {
		t.Fatalf("%d request series after Remove, want 3", n)
	}
	if err := c.Add(fixed{name: "a"}); err != nil {
		t.Fatalf("a new cache named a after Remove: %v", err)
	}
}

// A real cache, scraped over HTTP: the counts follow what it did.
func TestScrapeRealCache(t *testing.T) {
	addr := os.Getenv("CACHEASIDE_REDIS_ADDR")
	if addr == "" {
		addr = miniredis.RunT(t).Addr()
	}
	rdb := redis.NewClient(&redis.Options{Addr: addr, ContextTimeoutEnabled: true})
	defer rdb.Close()
	prefix := fmt.Sprintf("cacheprometheus:%d:", time.Now().UnixNano())
	defer func() {
		keys, _ := rdb.Keys(context.Background(), prefix+"*").Result()
		if len(keys) > 0 {
			rdb.Del(context.Background(), keys...)
		}
	}()
	c, err := cacheaside.New(rdb, &cacheaside.Options[string]{Name: "tasks"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	load := func(context.Context) (string, error) { return "v", nil }
	for range 3 {
		if _, err := c.Get(ctx, prefix+"k", load); err != nil {
			t.Fatal(err)
		}
	}
	for range 2 {
		if _, err := c.Get(ctx, prefix+"gone", func(context.Context) (string, error) { return "", cacheaside.ErrNotFound }); !errors.Is(err, cacheaside.ErrNotFound) {
			t.Fatal(err)
		}
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewCollector("", c))
	srv := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, line := range []string{
		`cacheaside_requests_total{cache="tasks",result="hit"} 2`,
		`cacheaside_requests_total{cache="tasks",result="negative_hit"} 1`,
		`cacheaside_requests_total{cache="tasks",result="miss"} 2`,
		`cacheaside_loads_total{cache="tasks",result="ok"} 2`,
		`cacheaside_load_duration_seconds_count{cache="tasks"} 2`,
		`cacheaside_breaker_state{cache="tasks",state="closed"} 1`,
		`# HELP cacheaside_redis_errors_total Redis commands sent that failed`,
		`# TYPE cacheaside_load_duration_seconds histogram`,
	} {
		if !strings.Contains(string(body), line+"\n") && !strings.Contains(string(body), line) {
			t.Errorf("scrape lacks %q:\n%s", line, body)
		}
	}
}
