//! Test-only: a blocking client of the CRI image service (`runtime.v1.ImageService`), the
//! API the kubelet (and K3s's agent) pulls images through. crictl is not packaged for
//! Debian 12, so kagami's tests call containerd's CRI plugin with this instead.
//!
//! Everything is behind the `cri` feature (k8s-cri needs protoc to build).

#![cfg(feature = "cri")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
pub use k8s_cri::v1::AuthConfig;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{
    ImageFsInfoRequest, ImageSpec, ListImagesRequest, PullImageRequest, RemoveImageRequest,
};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// One connection to a CRI socket, with its own single-threaded runtime so that the
/// (synchronous) tests can call it directly.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    client: ImageServiceClient<Channel>,
}

/// An image as the CRI lists it.
#[derive(Debug, Clone)]
pub struct Image {
    pub id: String,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
}

impl Cri {
    /// Connects to the CRI gRPC socket (containerd's main socket).
    pub fn connect(socket: &Path) -> Result<Cri, tonic::transport::Error> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let socket: PathBuf = socket.to_path_buf();
        let channel = rt.block_on(async move {
            // The URI is unused: every connection goes to the socket.
            Endpoint::from_static("http://cri.invalid")
                .connect_timeout(Duration::from_secs(10))
                .timeout(Duration::from_secs(180))
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let socket = socket.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?))
                    }
                }))
                .await
        })?;
        Ok(Cri {
            rt,
            client: ImageServiceClient::new(channel),
        })
    }

    /// `PullImage`, as the kubelet sends it; returns the image reference (its id).
    pub fn pull(&mut self, image: &str, auth: Option<AuthConfig>) -> Result<String, tonic::Status> {
        let req = PullImageRequest {
            image: Some(spec(image)),
            auth,
            sandbox_config: None,
        };
        let resp = self.rt.block_on(self.client.pull_image(req))?;
        Ok(resp.into_inner().image_ref)
    }

    /// `RemoveImage` (by name, tag or id).
    pub fn remove(&mut self, image: &str) -> Result<(), tonic::Status> {
        let req = RemoveImageRequest {
            image: Some(spec(image)),
        };
        self.rt.block_on(self.client.remove_image(req))?;
        Ok(())
    }

    /// `ListImages`.
    pub fn list(&mut self) -> Result<Vec<Image>, tonic::Status> {
        let resp = self
            .rt
            .block_on(self.client.list_images(ListImagesRequest { filter: None }))?;
        Ok(resp
            .into_inner()
            .images
            .into_iter()
            .map(|i| Image {
                id: i.id,
                repo_tags: i.repo_tags,
                repo_digests: i.repo_digests,
            })
            .collect())
    }

    /// `ImageFsInfo`: true once the CRI image service answers.
    pub fn ready(&mut self) -> bool {
        self.rt
            .block_on(self.client.image_fs_info(ImageFsInfoRequest {}))
            .is_ok()
    }
}

fn spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.to_string(),
        ..Default::default()
    }
}

/// Basic credentials as the kubelet passes them from an image pull secret.
pub fn basic_auth(username: &str, password: &str) -> AuthConfig {
    AuthConfig {
        username: username.to_string(),
        password: password.to_string(),
        ..Default::default()
    }
}
