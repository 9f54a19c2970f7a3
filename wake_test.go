package cacheaside

import (
	"context"
	"fmt"
	"testing"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// A wake-up message can arrive late: pub/sub hands it over after the fill
// it reports was overwritten or invalidated, and after a Get that began
// later started waiting on another holder's lease. Such a Get must not take
// the message's entry as its answer: only the fill of the lease it waits
// for answers it.
func TestLateWakeMessageIgnored(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		holder, waiter := newCache[string](t, b, nil), newCache[string](t, b, nil)
		if waiter.wake == nil {
			t.Fatal("no wake channel")
		}
		waitFor(t, "the wake channel", waiter.wake.live.Load)
		ctx := context.Background()
		key := b.key("k")
		release, started := make(chan struct{}), make(chan struct{})
		done := make(chan string, 1)
		go func() {
			v, _ := holder.Get(ctx, key, func(context.Context) (string, error) { close(started); <-release; return "new", nil })
			done <- v
		}()
		<-started // holder has the lease
		got := make(chan string, 1)
		go func() {
			v, err := waiter.Get(ctx, key, func(context.Context) (string, error) { return "loaded by the waiter", nil })
			if err != nil {
				v = err.Error()
			}
			got <- v
		}()
		waitFor(t, "the waiter to wait on the lease", func() bool { return waiter.Stats().LeaseContended == 1 })
		// The late message: a value entry of an earlier lease (another token).
		old, _, err := waiter.encode("invalidated long ago", newToken(), envelope.Gen{}, 0)
		if err != nil {
			t.Fatal(err)
		}
		waiter.wake.wake(fmt.Sprintf("%d:%s%s", len(key), key, old))
		close(release)
		if v := <-got; v != "new" {
			t.Fatalf("the waiter returned %q, want the holder's fill \"new\"", v)
		}
		<-done
	})
}
