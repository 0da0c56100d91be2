// istio-csr: istio-agent's own CA client (Istio's citadel client) asking a
// CA for a certificate, for meshgate's interop test.
//
//	istio-csr ADDR SERVER_NAME ROOT_FILE TOKEN_FILE SPIFFE_ID
//
// Prints the chain the CA answered (leaf first, root last), or the error
// on stderr with exit status 1.
package main

import (
	"fmt"
	"os"
	"strings"

	"istio.io/istio/pkg/security"
	"istio.io/istio/security/pkg/credentialfetcher/plugin"
	"istio.io/istio/security/pkg/nodeagent/caclient/providers/citadel"
	pkiutil "istio.io/istio/security/pkg/pki/util"
)

func main() {
	if len(os.Args) != 6 {
		fmt.Fprintln(os.Stderr, "usage: istio-csr ADDR SERVER_NAME ROOT_FILE TOKEN_FILE SPIFFE_ID")
		os.Exit(2)
	}
	addr, name, root, token, id := os.Args[1], os.Args[2], os.Args[3], os.Args[4], os.Args[5]
	opts := &security.Options{
		CAEndpoint:    addr,
		CAEndpointSAN: name,
		ClusterID:     "Kubernetes",
		CredFetcher:   plugin.CreateTokenPlugin(token),
	}
	client, err := citadel.NewCitadelClient(opts, &citadel.TLSOptions{RootCert: root})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer client.Close()
	// istio-agent's default key: RSA 2048.
	csr, _, err := pkiutil.GenCSR(pkiutil.CertOptions{Host: id, RSAKeySize: 2048})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	chain, err := client.CSRSign(csr, 3600)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Print(strings.Join(chain, ""))
}
