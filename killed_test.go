package cacheaside

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// TestFaultKilledDefaultClient: a client made as most people make it (go-redis
// defaults: MaxRetries 3, DialerRetries 5, with and without
// ContextTimeoutEnabled), a warm key, then redis-server is SIGKILLed. The
// next 50 Gets, each with a 1s deadline and a 5ms loader, must all return the
// loader's value, and the first within loader + OpTimeout + 10ms (a
// timer-free budget whose Done still closes at the budget cuts go-redis's
// retry and dial backoffs; see budget.go).
func TestFaultKilledDefaultClient(t *testing.T) {
	for _, cte := range []bool{true, false} {
		t.Run(fmt.Sprintf("ContextTimeoutEnabled=%v", cte), func(t *testing.T) {
			srv := startRedis(t)
			rdb := redis.NewClient(&redis.Options{Addr: srv.addr(), ContextTimeoutEnabled: cte})
			t.Cleanup(func() { _ = rdb.Close() })
			c, err := New[string](rdb, nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = c.Close() })
			const loader = 5 * time.Millisecond
			load := func(ctx context.Context) (string, error) {
				select {
				case <-time.After(loader):
					return "v", nil
				case <-ctx.Done():
					return "", ctx.Err()
				}
			}
			ctx := context.Background()
			for i := range 10 { // warm keys and pooled connections
				if _, err := c.Get(ctx, fmt.Sprint("k", i), load); err != nil {
					t.Fatal(err)
				}
			}
			srv.kill()
			bound := loader + DefaultOpTimeout + 10*time.Millisecond
			if raceEnabled {
				bound += 40 * time.Millisecond // the race detector's own cost, not Redis's
			}
			var worst time.Duration
			for i := range 50 {
				gctx, cancel := context.WithTimeout(ctx, time.Second)
				start := time.Now()
				v, err := c.Get(gctx, fmt.Sprint("k", i%10), load)
				took := time.Since(start)
				cancel()
				if err != nil || v != "v" {
					t.Fatalf("Get %d after the kill = %q, %v after %v", i, v, err, took)
				}
				if i == 0 {
					t.Logf("first Get after the kill: %v (bound %v)", took, bound)
					if took > bound {
						t.Errorf("first Get after the kill took %v, over loader + OpTimeout + 10ms = %v", took, bound)
					}
				}
				worst = max(worst, took)
			}
			t.Logf("slowest of 50 Gets after the kill: %v; stats %+v", worst, c.Stats())
		})
	}
}
