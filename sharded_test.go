package cacheaside

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside/internal/wire"
)

// noSharded is a Cluster client whose server, as far as the library can
// tell, has no sharded pub/sub (Redis 6, or an ACL without SPUBLISH): its
// SPUBLISH is refused as an unknown command.
type noSharded struct{ *redis.ClusterClient }

func (noSharded) SPublish(ctx context.Context, _ string, _ any) *redis.IntCmd {
	cmd := redis.NewIntCmd(ctx)
	cmd.SetErr(unknownCommand("ERR unknown command 'spublish', with args beginning with: "))
	return cmd
}

// unknownCommand is a server's error reply.
type unknownCommand string

func (e unknownCommand) Error() string { return string(e) }
func (unknownCommand) RedisError()     {}

// TestClusterShardedPubSub: on a 3-master, 3-replica cluster of Redis 7,
// ten Caches with a local tier on one ClusterClient hold one subscription
// connection among them, subscribed by SSUBSCRIBE to their twenty
// channels; they hear another process's invalidations and a holder's
// wake message (which the Cache publishes after the fill script); and a
// bus message costs the cluster bus one message, to the shard's replica,
// where a PUBLISH costs one to each of the five other nodes. The same run
// with a client whose SPUBLISH is refused (classic pub/sub, as on Redis
// 6) is the comparison, and shows the count can tell them apart.
func TestClusterShardedPubSub(t *testing.T) {
	if os.Getenv(envCluster) != "1" {
		t.Skipf("Redis Cluster tests are off; run them with %s=1", envCluster)
	}
	addrs, procs := startClusterOf(t, 3, 1)
	waitReplicasInSync(t, procs)
	nodes := make([]*redis.Client, len(procs))
	for i, p := range procs {
		nodes[i] = redis.NewClient(&redis.Options{Addr: p.addr()})
		t.Cleanup(func() { _ = nodes[i].Close() })
	}
	ctx := context.Background()
	for _, sharded := range []bool{true, false} {
		t.Run(map[bool]string{true: "sharded", false: "classic"}[sharded], func(t *testing.T) {
			p := uniquePrefix()
			clientName := "ps" + strings.ReplaceAll(strings.Trim(p, ":"), ":", "")
			newClient := func(name string) Redis {
				cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: addrs, ContextTimeoutEnabled: true, ClientName: name})
				t.Cleanup(func() { _ = cc.Close() })
				if sharded {
					return cc
				}
				return noSharded{cc}
			}
			opts := func(i int) *Options[string] {
				return &Options[string]{Name: fmt.Sprintf("%sc%d", p, i), Local: &LocalOptions{TTL: time.Hour},
					PollMin: 30 * time.Second, PollMax: 30 * time.Second, // without a wake message, a waiter looks again after a minute or two
					Degradation: Degradation{OpTimeout: 2 * time.Second}}
			}
			newOn := func(rdb Redis, i int) *Cache[string] {
				c, err := New[string](rdb, opts(i))
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { _ = c.Close() })
				return c
			}
			a := newClient(clientName)
			var caches []*Cache[string]
			for i := range 10 {
				caches = append(caches, newOn(a, i))
			}
			for _, c := range caches {
				waitFor(t, "every cache's channels", func() bool { return c.local.live.Load() && c.wake.live.Load() })
			}
			if got := caches[0].hub.mode.Load() == modeSharded; got != sharded {
				t.Fatalf("sharded pub/sub %v, want %v", got, sharded)
			}

			// One subscription connection on the whole cluster, holding all
			// twenty channels.
			var conns []string
			for _, n := range nodes {
				list, err := n.Do(ctx, "CLIENT", "LIST", "TYPE", "pubsub").Text()
				if err != nil {
					t.Fatal(err)
				}
				for _, line := range strings.Split(list, "\n") {
					if strings.Contains(line, " name="+clientName+" ") {
						conns = append(conns, n.Options().Addr+": "+line)
					}
				}
			}
			field := map[bool]string{true: " ssub=", false: " sub="}[sharded]
			if len(conns) != 1 || !strings.Contains(conns[0], field+"20 ") {
				t.Fatalf("subscription connections of 10 caches on one client: %d, want 1 with%s20:\n%s", len(conns), field, strings.Join(conns, "\n"))
			}

			// Another process's invalidation reaches cache 3's local tier.
			key := p + "shared"
			load := func(v string) func(context.Context) (string, error) {
				return func(context.Context) (string, error) { return v, nil }
			}
			if v, _ := caches[3].Get(ctx, key, load("old")); v != "old" {
				t.Fatalf("first Get = %q", v)
			}
			other := newOn(newClient(clientName+"b"), 3)
			waitFor(t, "the other process's channels", func() bool { return other.local.live.Load() && other.wake.live.Load() })
			if _, err := other.Invalidate(ctx, key); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "cache 3 to hear the invalidation", func() bool {
				v, _ := caches[3].Get(ctx, key, load("new"))
				return v == "new"
			})

			// What a bus message costs the cluster bus: messages sent between
			// nodes for PUBLISH and SPUBLISH, summed over the six nodes.
			busSent := func() int64 {
				var total int64
				for _, n := range nodes {
					info, err := n.ClusterInfo(ctx).Result()
					if err != nil {
						t.Fatal(err)
					}
					for _, line := range strings.Split(info, "\r\n") {
						k, v, _ := strings.Cut(line, ":")
						if k == "cluster_stats_messages_publish_sent" || k == "cluster_stats_messages_publishshard_sent" {
							n, _ := strconv.ParseInt(v, 10, 64)
							total += n
						}
					}
				}
				return total
			}
			const msgs = 20
			before, heard := busSent(), caches[3].Stats().BusMessages
			for i := range msgs {
				if _, err := other.Invalidate(ctx, fmt.Sprintf("%sk%d", p, i)); err != nil {
					t.Fatal(err)
				}
			}
			waitFor(t, "cache 3 to hear them", func() bool { return caches[3].Stats().BusMessages >= heard+msgs })
			sent := busSent() - before
			t.Logf("%d bus messages: %d cluster-bus messages between the 6 nodes (%.1f each)", msgs, sent, float64(sent)/msgs)
			if sharded && sent > msgs {
				t.Errorf("%d cluster-bus messages for %d sharded messages; want at most one each (to the shard's replica)", sent, msgs)
			}
			if !sharded && sent < 5*msgs {
				t.Errorf("%d cluster-bus messages for %d PUBLISHes; want one to each other node (5 each)", sent, msgs)
			}

			// A holder in the other process wakes a waiter here: the waiter
			// would look again only after a minute or more, and gives up
			// after 15s, so it answers in time only by the message.
			wkey := p + "contended"
			release, started := make(chan struct{}), make(chan struct{})
			go func() {
				_, _ = other.Get(ctx, wkey, func(context.Context) (string, error) { close(started); <-release; return "the holder's", nil })
			}()
			<-started
			got := make(chan string, 1)
			go func() {
				ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
				defer cancel()
				v, err := caches[3].Get(ctx, wkey, load("loaded by the waiter"))
				if err != nil {
					v = err.Error()
				}
				got <- v
			}()
			waitFor(t, "the waiter to wait on the lease", func() bool { return caches[3].Stats().LeaseContended == 1 })
			close(release)
			if v := <-got; v != "the holder's" {
				t.Fatalf("the waiter returned %q, want the holder's fill (its wake message was lost)", v)
			}
			if sharded {
				moveShardSlot(t, nodes, clientName, caches, other)
			}
		})
	}
}

// moveShardSlot moves the slot of wire.ShardTag to another master. Its old
// master then ends the sharded subscriptions in it (an "sunsubscribe"
// nobody asked for); the hub must hear that as a loss, follow the slot to
// its new master, and the caches hear invalidations again.
func moveShardSlot(t *testing.T, nodes []*redis.Client, clientName string, caches []*Cache[string], other *Cache[string]) {
	t.Helper()
	ctx := context.Background()
	slot, err := nodes[0].ClusterKeySlot(ctx, wire.ShardTag).Result()
	if err != nil {
		t.Fatal(err)
	}
	var from, to *redis.Client
	var toID string
	for _, n := range nodes {
		info, err := n.Info(ctx, "replication").Result()
		if err != nil || !strings.Contains(info, "role:master") {
			continue
		}
		shards, err := n.ClusterShards(ctx).Result()
		if err != nil {
			t.Fatal(err)
		}
		id, err := n.ClusterMyID(ctx).Result()
		if err != nil {
			t.Fatal(err)
		}
		for _, sh := range shards {
			for _, r := range sh.Slots {
				for _, node := range sh.Nodes {
					if r.Start <= slot && slot <= r.End && node.ID == id && node.Role == "master" {
						from = n
					}
				}
			}
		}
		if from != n && to == nil {
			to, toID = n, id
		}
	}
	if from == nil || to == nil {
		t.Fatalf("slot %d: master %v, another master %v", slot, from, to)
	}
	// The new owner first, then the old one (which ends the subscriptions),
	// then the rest learn it by gossip.
	for _, n := range []*redis.Client{to, from} {
		if err := n.Do(ctx, "CLUSTER", "SETSLOT", slot, "NODE", toID).Err(); err != nil {
			t.Fatal(err)
		}
	}
	onNew := func() bool {
		list, err := to.Do(ctx, "CLIENT", "LIST", "TYPE", "pubsub").Text()
		return err == nil && strings.Contains(list, " name="+clientName+" ") && strings.Contains(list, " ssub=20 ")
	}
	waitFor(t, "the subscription to follow its slot to the new master", onNew)
	for _, c := range caches {
		waitFor(t, "every cache's channels", func() bool { return c.local.live.Load() && c.wake.live.Load() })
	}
	waitFor(t, "the other process's channels", func() bool { return other.local.live.Load() && other.wake.live.Load() })
	key := caches[3].name + ":after-move"
	load := func(v string) func(context.Context) (string, error) {
		return func(context.Context) (string, error) { return v, nil }
	}
	if v, _ := caches[3].Get(ctx, key, load("old")); v != "old" {
		t.Fatalf("Get after the move = %q", v)
	}
	if _, err := other.Invalidate(ctx, key); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "cache 3 to hear an invalidation after the move", func() bool {
		v, _ := caches[3].Get(ctx, key, load("new"))
		return v == "new"
	})
}
