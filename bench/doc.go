// Package bench compares cacheaside with other Go caches under the same
// harness. It is a module of its own, so the core does not depend on the
// libraries it is compared with, and it is not published. Run it with
//
//	CACHEASIDE_REDIS_ADDR=127.0.0.1:6379 go -C bench test -run '^$' -bench . -benchtime 30x .
package bench
