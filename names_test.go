package cacheaside

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// TestDuplicateName: New refuses a second live cache of the same Name on
// the same client when its value type or codec differs (they would share
// channels and overwrite each other's entries as corrupt), allows one that
// is alike, and forgets a name at Close.
func TestDuplicateName(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		rdb := b.client(t)
		tasks, err := New[string](rdb, &Options[string]{Name: "dup"})
		if err != nil {
			t.Fatal(err)
		}
		_, err = New[int](rdb, &Options[int]{Name: "dup"})
		if !errors.Is(err, ErrInvalidOptions) || !strings.Contains(err.Error(), `"dup"`) ||
			!strings.Contains(err.Error(), "Cache[string]") || !strings.Contains(err.Error(), "Cache[int]") {
			t.Fatalf("New[int] with a live Cache[string] of the same Name = %v, want ErrInvalidOptions naming both", err)
		}
		if _, err := New[string](rdb, &Options[string]{Name: "dup", Codec: Msgpack[string]()}); !errors.Is(err, ErrInvalidOptions) || !strings.Contains(err.Error(), "format 2") {
			t.Fatalf("New with another codec = %v, want ErrInvalidOptions", err)
		}
		alike, err := New[string](rdb, &Options[string]{Name: "dup"})
		if err != nil {
			t.Fatalf("a second cache alike: %v", err)
		}
		other := b.client(t) // another client, as another process has
		ints, err := New[int](other, &Options[int]{Name: "dup"})
		if err != nil {
			t.Fatalf("another client: %v", err)
		}
		_ = ints.Close()
		_ = tasks.Close()
		if _, err := New[int](rdb, &Options[int]{Name: "dup"}); !errors.Is(err, ErrInvalidOptions) {
			t.Fatalf("with one Cache[string] still live: %v", err)
		}
		_ = alike.Close()
		_ = alike.Close() // Close twice forgets the name once
		ints, err = New[int](rdb, &Options[int]{Name: "dup"})
		if err != nil {
			t.Fatalf("after every Cache[string] closed: %v", err)
		}
		_ = ints.Close()
		// The refused New left nothing running: goleak checks at exit.

		// A wrapper passed by value whose type is comparable but whose
		// value is not (an interface field holding a map) is not tracked,
		// rather than panicking as a map key.
		w, err := New[string](valueWrapper{Redis: rdb, tag: map[string]int{}}, &Options[string]{Name: "dup"})
		if err != nil {
			t.Fatalf("a wrapper value: %v", err)
		}
		_ = w.Close()
	})
}

type valueWrapper struct {
	Redis
	tag any
}

// TestNegativeTTLWarning: a NegativeTTL set longer than the TTL is
// warned about; the default NegativeTTL never exceeds the TTL.
func TestNegativeTTLWarning(t *testing.T) {
	rdb := redis.NewClient(&redis.Options{Addr: miniredisRun(t).Addr(), ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = rdb.Close() })
	for _, tc := range []struct {
		name string
		p    Policy
		warn bool
		neg  time.Duration
	}{
		{"longer", Policy{TTL: time.Minute, NegativeTTL: 5 * time.Minute}, true, 5 * time.Minute},
		{"default under a short TTL", Policy{TTL: 10 * time.Second}, false, 10 * time.Second},
		{"default", Policy{}, false, defaultNegativeTTL},
		{"off", Policy{TTL: time.Minute, NegativeTTL: 5 * time.Minute, NoNegativeCache: true}, false, 5 * time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var logs logText
			c, err := New[string](rdb, &Options[string]{Name: "neg-" + tc.name, Policy: tc.p, Logger: logs.logger()})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if got := len(logs.linesWith("level=WARN", "NegativeTTL is longer than Policy.TTL")); got != map[bool]int{true: 1}[tc.warn] {
				t.Errorf("%d warnings, want warn=%v:\n%s", got, tc.warn, logs.String())
			}
			if got := c.opts.Policy.NegativeTTL; got != tc.neg {
				t.Errorf("NegativeTTL %v, want %v", got, tc.neg)
			}
		})
	}
}

// TestGetManyNilArguments: the error names the nil argument.
func TestGetManyNilArguments(t *testing.T) {
	rdb := redis.NewClient(&redis.Options{Addr: miniredisRun(t).Addr(), ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = rdb.Close() })
	c, err := New[string](rdb, &Options[string]{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	key := func(id int) string { return "k" }
	load := func(context.Context, []int) (map[int]string, error) { return nil, nil }
	for _, tc := range []struct {
		want string
		call func() error
	}{
		{"argument c", func() error { _, err := GetMany(ctx, nil, []int{1}, key, load); return err }},
		{"argument key", func() error { _, err := GetMany(ctx, c, []int{1}, nil, load); return err }},
		{"argument load", func() error { _, err := GetMany[int](ctx, c, []int{1}, key, nil); return err }},
	} {
		if err := tc.call(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("error %v, want it to name %s", err, tc.want)
		}
	}
}

// TestRecommended: every options type gets the settings, a value the
// caller set is kept, and nil means new options.
func TestRecommended(t *testing.T) {
	o := Recommended(&redis.Options{Addr: "x:1", MaxRetries: 2, ReadTimeout: time.Second})
	if !o.ContextTimeoutEnabled || o.MaxRetries != 2 || o.DialerRetries != 1 || o.ReadTimeout != time.Second || o.Addr != "x:1" {
		t.Errorf("Options: %+v", o)
	}
	if o := Recommended[*redis.Options](nil); o == nil || !o.ContextTimeoutEnabled || o.MaxRetries != -1 {
		t.Errorf("nil Options: %+v", o)
	}
	if o := Recommended(&redis.ClusterOptions{}); !o.ContextTimeoutEnabled || o.MaxRetries != -1 || o.DialerRetries != 1 || o.ClusterStateReloadInterval != defaultClusterStateReloadInterval {
		t.Errorf("ClusterOptions: %+v", o)
	}
	if o := Recommended(&redis.ClusterOptions{ClusterStateReloadInterval: 5 * time.Second}); o.ClusterStateReloadInterval != 5*time.Second {
		t.Errorf("ClusterOptions with its own reload interval: %v", o.ClusterStateReloadInterval)
	}
	if o := Recommended(&redis.FailoverOptions{}); !o.ContextTimeoutEnabled || o.MaxRetries != -1 || o.DialerRetries != 1 {
		t.Errorf("FailoverOptions: %+v", o)
	}
	if o := Recommended(&redis.RingOptions{}); !o.ContextTimeoutEnabled || o.MaxRetries != -1 || o.DialerRetries != 1 {
		t.Errorf("RingOptions: %+v", o)
	}
	if o := Recommended(&redis.UniversalOptions{}); !o.ContextTimeoutEnabled || o.MaxRetries != -1 || o.DialerRetries != 1 {
		t.Errorf("UniversalOptions: %+v", o)
	}
}

// TestRecommendedRefusedFast: on a recommended client, a Redis that is
// not there shows up as "connection refused", not as the budget running
// out.
func TestRecommendedRefusedFast(t *testing.T) {
	rdb := redis.NewClient(Recommended(&redis.Options{Addr: closedAddr(t)}))
	t.Cleanup(func() { _ = rdb.Close() })
	var first error
	c, err := New[string](rdb, &Options[string]{Logger: slog.New(slog.DiscardHandler), OnError: func(_ context.Context, err error) {
		if first == nil {
			first = err
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if v, err := c.Get(context.Background(), "k", func(context.Context) (string, error) { return "v", nil }); err != nil || v != "v" {
		t.Fatalf("Get = %q, %v", v, err)
	}
	if first == nil || !strings.Contains(first.Error(), "connection refused") {
		t.Fatalf("first error %v, want connection refused", first)
	}
}
