package cacheaside

import (
	"errors"
	"math"
	"strings"
	"testing"
	"time"
)

func TestPolicyValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		p    Policy
		ok   bool
	}{
		{"zero is defaults", Policy{}, true},
		{"explicit", Policy{TTL: time.Minute, NegativeTTL: time.Second, Jitter: 0.5}, true},
		{"no jitter", Policy{NoJitter: true}, true},
		{"negative TTL", Policy{TTL: -time.Second}, false},
		{"sub-millisecond TTL", Policy{TTL: time.Microsecond}, false},
		{"negative NegativeTTL", Policy{NegativeTTL: -1}, false},
		{"jitter 1", Policy{Jitter: 1}, false},
		{"jitter negative", Policy{Jitter: -0.1}, false},
		{"jitter NaN", Policy{Jitter: math.NaN()}, false},
		{"jitter and NoJitter", Policy{Jitter: 0.2, NoJitter: true}, false},
		{"stale windows", Policy{StaleWhileRevalidate: time.Minute, StaleIfError: time.Hour}, true},
		{"negative SWR", Policy{StaleWhileRevalidate: -1}, false},
		{"negative SIE", Policy{StaleIfError: -1}, false},
		{"negative beta", Policy{Beta: -1}, false},
		{"infinite beta", Policy{Beta: math.Inf(1)}, false},
		{"beta and NoEarlyRefresh", Policy{Beta: 2, NoEarlyRefresh: true}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.p.validate()
			if tc.ok && err != nil {
				t.Fatalf("Validate = %v, want nil", err)
			}
			if !tc.ok && !errors.Is(err, ErrInvalidOptions) {
				t.Fatalf("Validate = %v, want ErrInvalidOptions", err)
			}
		})
	}
}

func TestPolicyJitterRange(t *testing.T) {
	p := Policy{TTL: time.Minute, Jitter: 0.2}.resolved()
	lo, hi := time.Duration(float64(time.Minute)*0.8), time.Minute
	seen := map[bool]bool{}
	for i := 0; i < 1000; i++ {
		d := p.jitter(p.TTL)
		if d < lo || d > hi {
			t.Fatalf("jittered TTL %v outside [%v, %v]", d, lo, hi)
		}
		seen[d < time.Duration(float64(time.Minute)*0.9)] = true
	}
	if len(seen) != 2 {
		t.Fatal("jitter never spread the TTLs across its range")
	}
	exact := Policy{TTL: time.Minute, NoJitter: true}.resolved()
	if d := exact.jitter(exact.TTL); d != time.Minute {
		t.Fatalf("NoJitter TTL = %v", d)
	}
	if d := (Policy{}).resolved(); d.TTL != defaultTTL || d.NegativeTTL != defaultNegativeTTL || d.Jitter != defaultJitter {
		t.Fatalf("defaults = %+v", d)
	}
}

func TestTTLTable(t *testing.T) {
	table, err := NewTTLTable(map[string]Policy{
		"task":      {TTL: 5 * time.Minute, NegativeTTL: time.Minute},
		"task_list": {TTL: time.Minute},
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := table.Get("task").TTL; got != 5*time.Minute {
		t.Fatalf("task TTL = %v", got)
	}
	if got := strings.Join(table.Names(), ","); got != "task,task_list" {
		t.Fatalf("Names = %s", got)
	}
	func() {
		defer func() {
			if r := recover(); r == nil || !strings.Contains(r.(string), "tsk") {
				t.Fatalf("Get of a misspelt name: recover() = %v", r)
			}
		}()
		table.Get("tsk")
	}()

	o, err := table.WithOverrides(" task=2m, task_list.ttl=30s ,task.negative=10s,task_list.jitter=0.25,task_list.negative=off")
	if err != nil {
		t.Fatal(err)
	}
	if p := o.Get("task"); p.TTL != 2*time.Minute || p.NegativeTTL != 10*time.Second {
		t.Fatalf("task after override = %+v", p)
	}
	if p := o.Get("task_list"); p.TTL != 30*time.Second || p.Jitter != 0.25 || !p.NoNegativeCache {
		t.Fatalf("task_list after override = %+v", p)
	}
	if table.Get("task").TTL != 5*time.Minute {
		t.Fatal("WithOverrides changed the original table")
	}
	if o, _ := table.WithOverrides("task.jitter=0"); !o.Get("task").NoJitter {
		t.Fatal("jitter=0 did not turn jitter off")
	}
	o, err = table.WithOverrides("task.swr=30s,task.sie=5m,task.beta=2,task_list.beta=0")
	if err != nil {
		t.Fatal(err)
	}
	if p := o.Get("task"); p.StaleWhileRevalidate != 30*time.Second || p.StaleIfError != 5*time.Minute || p.Beta != 2 {
		t.Fatalf("freshness overrides = %+v", p)
	}
	if p := o.Get("task_list"); !p.NoEarlyRefresh || p.Beta != 0 {
		t.Fatalf("beta=0 = %+v, want early refresh off", p)
	}
	if p := (Policy{}).resolved(); p.Beta != defaultBeta {
		t.Fatalf("default beta = %v", p.Beta)
	}
	if same, err := table.WithOverrides("  "); err != nil || same != table {
		t.Fatal("empty spec should return the table")
	}
	for _, bad := range []string{
		"nope=1m", "task", "task=", "=1m", "task=abc", "task=-1s", "task=0s",
		"task.color=red", "task.jitter=1.5", "task.jitter=x", "task=1m,task=2m", "task=1us",
		"task.swr=-1s", "task.sie=x", "task.beta=-1", "task.beta=x",
	} {
		if _, err := table.WithOverrides(bad); !errors.Is(err, ErrInvalidOptions) {
			t.Errorf("WithOverrides(%q) = %v, want ErrInvalidOptions", bad, err)
		}
	}
	for _, bad := range []map[string]Policy{
		{"": {}}, {"a b": {}}, {"ok": {TTL: -1}},
	} {
		if _, err := NewTTLTable(bad); !errors.Is(err, ErrInvalidOptions) {
			t.Errorf("NewTTLTable(%v) = %v, want ErrInvalidOptions", bad, err)
		}
	}
}
