#!/usr/bin/env bash
# Provide real etcd and kube-apiserver binaries for the local control plane (the envtest
# approach), cached outside the repository. Prints the assets folder on stdout.
#
# Order of preference:
#   1. $KUBEBUILDER_ASSETS, when it holds both binaries;
#   2. the cache ($GPUROUTE_CACHE, default ~/.cache/gpuroute/kube-assets);
#   3. a build: etcd from Debian's etcd-server (3.4), kube-apiserver from Debian bookworm's
#      kubernetes source package (1.20), built with Debian's Go 1.19.
set -euo pipefail

cache_root="${GPUROUTE_CACHE:-$HOME/.cache/gpuroute}"
assets="$cache_root/kube-assets"
log() { echo "kube-assets: $*" >&2; }

if [[ -n "${KUBEBUILDER_ASSETS:-}" && -x "$KUBEBUILDER_ASSETS/etcd" && -x "$KUBEBUILDER_ASSETS/kube-apiserver" ]]; then
  echo "$KUBEBUILDER_ASSETS"; exit 0
fi
if [[ -x "$assets/etcd" && -x "$assets/kube-apiserver" ]]; then
  echo "$assets"; exit 0
fi

mkdir -p "$assets"
exec 9>"$cache_root/.kube-assets.lock"
flock 9
# Another process may have finished the build while we waited for the lock.
if [[ -x "$assets/etcd" && -x "$assets/kube-apiserver" ]]; then
  echo "$assets"; exit 0
fi

sudo_() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
export DEBIAN_FRONTEND=noninteractive

src_list=/etc/apt/sources.list.d/gpuroute-deb-src.sources
if [[ ! -f $src_list ]]; then
  log "adding a deb-src entry for the Debian mirror"
  # Same mirror and suite as the binary entry; kube-apiserver is only in Debian's source.
  sudo_ tee "$src_list" >/dev/null <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
log "apt-get update"
sudo_ apt-get update -qq >&2
log "installing etcd-server, golang-go, reflect2 1.0.2, dpkg-dev"
sudo_ apt-get install -y -qq --no-install-recommends etcd-server golang-go \
  golang-github-modern-go-reflect2-dev dpkg-dev rsync >&2

# etcd-server's unit starts etcd on :2379; the harness runs its own on free ports.
sudo_ systemctl disable --now etcd >/dev/null 2>&1 || true
cp "$(command -v etcd)" "$assets/etcd.tmp" && mv "$assets/etcd.tmp" "$assets/etcd"

work=$(mktemp -d "$cache_root/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
log "fetching the kubernetes source package into $work"
(cd "$work" && apt-get source --download-only -qq kubernetes >&2 && dpkg-source -x --skip-patches kubernetes_*.dsc src >&2) \
  || (cd "$work" && apt-get source -qq kubernetes >&2 && mv kubernetes-*/ src)

gopath="$work/gopath"
mkdir -p "$gopath/src/k8s.io"
mv "$work/src" "$gopath/src/k8s.io/kubernetes"
k8s="$gopath/src/k8s.io/kubernetes"
# reflect2 1.0.1 (vendored) crashes the apiserver under Go 1.19 on the first custom
# resource create; 1.0.2 from Debian fixes it.
rm -rf "$k8s/vendor/github.com/modern-go/reflect2"
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$k8s/vendor/github.com/modern-go/reflect2"

log "building kube-apiserver (about 3 minutes on 2 cores)"
(cd "$k8s" && GOPATH="$gopath" GO111MODULE=off GOFLAGS=-mod=vendor \
   KUBE_GIT_VERSION=v1.20.0 KUBE_GIT_TREE_STATE=clean \
   make WHAT=cmd/kube-apiserver >&2) || {
  log "make failed; trying go build directly"
  (cd "$k8s" && GOPATH="$gopath" GO111MODULE=off go build -o _output/bin/kube-apiserver ./cmd/kube-apiserver >&2)
}
bin=$(find "$k8s/_output" -type f -name kube-apiserver -perm -u+x | head -n 1)
[[ -n "$bin" ]] || { log "kube-apiserver was not built"; exit 1; }
cp "$bin" "$assets/kube-apiserver.tmp" && mv "$assets/kube-apiserver.tmp" "$assets/kube-apiserver"
log "ready: $assets"
echo "$assets"
