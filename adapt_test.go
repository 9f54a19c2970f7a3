package cacheaside

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// TestAdaptiveBudget: the read budget follows 4 × the 99th percentile of
// answered reads (its power-of-two bucket's upper edge), within the floor
// and the ceiling; it doubles when over 1% of a window's reads pass it
// while others are answered; reads that all time out leave it alone; and
// floor == ceiling fixes it.
func TestAdaptiveBudget(t *testing.T) {
	const floor, ceil = 50 * time.Millisecond, 200 * time.Millisecond
	window := func(a *adaptive, d time.Duration, timeouts int) {
		for range timeouts {
			a.timedOut()
		}
		for range adaptWindow - timeouts {
			a.answered(d)
		}
	}
	for _, tc := range []struct {
		name     string
		steps    func(a *adaptive)
		want     time.Duration
		floor    time.Duration
		ceilSame bool
	}{
		{"fast Redis: the floor", func(a *adaptive) { window(a, 300*time.Microsecond, 0) }, floor, floor, false},
		{"30ms answers: 4 × 32.768ms", func(a *adaptive) { window(a, 30*time.Millisecond, 0) }, 4 * 32768 * time.Microsecond, floor, false},
		{"slower still: the ceiling", func(a *adaptive) { window(a, 90*time.Millisecond, 0) }, ceil, floor, false},
		{"2% past the budget: doubled", func(a *adaptive) { window(a, time.Millisecond, 4) }, 2 * floor, floor, false},
		{"1% past the budget: the percentile", func(a *adaptive) { window(a, time.Millisecond, 2) }, floor, floor, false},
		{"nothing answered: unchanged", func(a *adaptive) { window(a, 30*time.Millisecond, 0); window(a, 0, adaptWindow) }, 4 * 32768 * time.Microsecond, floor, false},
		{"back to fast: down again", func(a *adaptive) {
			window(a, 30*time.Millisecond, 0)
			for range 8 {
				window(a, 300*time.Microsecond, 0)
			}
		}, floor, floor, false},
		{"a fixed budget", func(a *adaptive) { window(a, 90*time.Millisecond, 0) }, floor, floor, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := ceil
			if tc.ceilSame {
				c = tc.floor
			}
			a := newAdaptive(tc.floor, c)
			tc.steps(a)
			if got := a.budget(); got != tc.want {
				t.Errorf("budget %v, want %v", got, tc.want)
			}
		})
	}
}

// delayedReads plays a Redis that answers every GET and MGET after delay,
// or at the command's deadline with a timeout if that comes first.
type delayedReads struct {
	*redis.Client
	delay atomic.Int64
}

func (d *delayedReads) wait(ctx context.Context) error {
	t := time.NewTimer(time.Duration(d.delay.Load()))
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (d *delayedReads) Get(ctx context.Context, key string) *redis.StringCmd {
	if err := d.wait(ctx); err != nil {
		cmd := redis.NewStringCmd(ctx, "get", key)
		cmd.SetErr(err)
		return cmd
	}
	return d.Client.Get(ctx, key)
}

func (d *delayedReads) MGet(ctx context.Context, keys ...string) *redis.SliceCmd {
	if err := d.wait(ctx); err != nil {
		cmd := redis.NewSliceCmd(ctx, "mget")
		cmd.SetErr(err)
		return cmd
	}
	return d.Client.MGet(ctx, keys...)
}

// TestSlowRedisStaysInUse: Redis's reads slow down to 30ms, and the budget
// grows with them (to 131ms); then to 80ms, past the 50ms OpTimeout, and
// the reads still hit: no load. The control, a fixed budget
// (MaxOpTimeout = OpTimeout), sends every read at 80ms to the loader.
func TestSlowRedisStaysInUse(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		for _, fixed := range []bool{false, true} {
			t.Run(map[bool]string{false: "adaptive", true: "fixed (control)"}[fixed], func(t *testing.T) {
				ctx := context.Background()
				rdb := &delayedReads{Client: b.client(t)}
				d := Degradation{OpTimeout: 50 * time.Millisecond, BreakerFailures: 1 << 20}
				if fixed {
					d.MaxOpTimeout = d.OpTimeout
				}
				// Each Get its own read, so each is one sample.
				c, err := New[string](rdb, &Options[string]{Name: fmt.Sprintf("slow%v", fixed), Policy: Policy{TTL: time.Hour}, NoReadCoalescing: true, Degradation: d})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { _ = c.Close() })
				var loads atomic.Int64
				load := func(context.Context) (string, error) { loads.Add(1); return "v", nil }
				keys := make([]string, 20)
				for i := range keys {
					keys[i] = b.key(fmt.Sprintf("k%d", i))
					if _, err := c.Get(ctx, keys[i], load); err != nil {
						t.Fatal(err)
					}
				}
				// Every key is cached; from here a load is a read that failed.
				round := func() {
					var wg sync.WaitGroup
					for _, k := range keys {
						wg.Go(func() { _, _ = c.Get(ctx, k, load) })
					}
					wg.Wait()
				}
				rdb.delay.Store(int64(30 * time.Millisecond))
				for range 2 * adaptWindow / len(keys) {
					round()
				}
				grown := c.Stats().ReadBudget
				rdb.delay.Store(int64(80 * time.Millisecond))
				loads.Store(0)
				for range 3 {
					round()
				}
				t.Logf("budget after 30ms reads %v, now %v; %d of %d Gets at 80ms loaded", grown, c.Stats().ReadBudget, loads.Load(), 3*len(keys))
				if fixed {
					if grown != d.OpTimeout || loads.Load() == 0 {
						t.Fatalf("control: budget %v and %d loads; want %v and reads failing to the loader", grown, loads.Load(), d.OpTimeout)
					}
					return
				}
				if grown <= 80*time.Millisecond || loads.Load() != 0 {
					t.Fatalf("budget %v after 30ms reads and %d loads at 80ms; want a budget past 80ms and no load", grown, loads.Load())
				}
			})
		}
	})
}
