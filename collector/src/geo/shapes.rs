//! Country geometry: a TopoJSON decoder and the countries shipped with the collector
//! (`collector/assets/geo/`, Natural Earth via world-atlas; see its README).
//!
//! [`decode`] turns one TopoJSON object (a `GeometryCollection` of `Polygon`s and
//! `MultiPolygon`s) into plain longitude/latitude rings: each arc is quantized and
//! delta-encoded (`x += dx, y += dy`, then `x × scale + translate`), a negative arc index `~i`
//! is arc `i` reversed, and consecutive arcs of a ring share their joining point. It is the
//! one decoder of the project (the web console's map can reuse it with `countries-110m.json`).
//!
//! [`Countries`] keeps every country's polygons by ISO 3166-1 alpha-2 code (the geometry's
//! numeric `id` mapped through `iso3166.csv`; geometries without one are keyed
//! `name:<name>`) with what makes distances fast: unit vectors of every point, and for each
//! run of [`CHUNK_SEGMENTS`] boundary segments a bounding cap (centre, angular radius), so a
//! search skips every chunk that cannot hold a nearer point. Distances are on a sphere of
//! [`EARTH_RADIUS_KM`], to the nearest point of a boundary segment (great-circle arcs), or 0
//! inside a polygon. [`Countries::shipped`] decodes `countries-50m.json` once per process.

use std::collections::{BTreeSet, HashMap};
use std::sync::OnceLock;

use serde::Deserialize;

/// Mean Earth radius, km.
pub const EARTH_RADIUS_KM: f64 = 6371.0;
/// Boundary segments per chunk of a ring (each chunk has a bounding cap).
pub const CHUNK_SEGMENTS: usize = 32;
/// The shipped 1:50 million country geometry (TopoJSON).
pub const COUNTRIES_50M: &str = include_str!("../../assets/geo/countries-50m.json");
/// The shipped 1:110 million country geometry (TopoJSON), for drawing.
pub const COUNTRIES_110M: &str = include_str!("../../assets/geo/countries-110m.json");
/// `key,alpha2,name`: a geometry's id (ISO 3166-1 numeric) or `name:<name>` → alpha-2.
pub const ISO3166_CSV: &str = include_str!("../../assets/geo/iso3166.csv");

/// Why a TopoJSON document could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum ShapesError {
    /// Not JSON of the TopoJSON shape.
    #[error("not a TopoJSON topology: {0}")]
    Json(#[from] serde_json::Error),
    /// The object asked for is absent.
    #[error("no object {0:?} in the topology")]
    NoObject(String),
    /// A geometry names an arc the topology does not have.
    #[error("geometry {geometry} names arc {arc}, the topology has {arcs}")]
    BadArc {
        /// The geometry's position.
        geometry: usize,
        /// The arc index as written.
        arc: i64,
        /// How many arcs there are.
        arcs: usize,
    },
}

#[derive(Deserialize)]
struct Topology {
    objects: HashMap<String, Collection>,
    arcs: Vec<Vec<[f64; 2]>>,
    transform: Option<Transform>,
}

#[derive(Deserialize)]
struct Transform {
    scale: [f64; 2],
    translate: [f64; 2],
}

#[derive(Deserialize)]
struct Collection {
    #[serde(default)]
    geometries: Vec<RawGeometry>,
}

#[derive(Deserialize)]
struct RawGeometry {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    arcs: serde_json::Value,
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    properties: Option<HashMap<String, serde_json::Value>>,
}

/// One decoded geometry: its id and name, and its polygons, each a list of rings (the
/// first the outer boundary, the others holes) of `[longitude, latitude]` points, closed
/// (the last point repeats the first).
#[derive(Debug, Clone, PartialEq)]
pub struct Geometry {
    /// The `id` as text ("504"), when present.
    pub id: Option<String>,
    /// `properties.name`, when present.
    pub name: Option<String>,
    /// Polygons → rings → points.
    pub polygons: Vec<Vec<Vec<[f64; 2]>>>,
    /// The arcs it is made of (absolute indices): two geometries sharing one touch.
    pub arcs: BTreeSet<usize>,
}

/// Decode the `GeometryCollection` named `object` of a TopoJSON document.
pub fn decode(topojson: &str, object: &str) -> Result<Vec<Geometry>, ShapesError> {
    let topo: Topology = serde_json::from_str(topojson)?;
    let collection = topo
        .objects
        .get(object)
        .ok_or_else(|| ShapesError::NoObject(object.to_owned()))?;
    let arcs: Vec<Vec<[f64; 2]>> = topo
        .arcs
        .iter()
        .map(|arc| absolute(arc, topo.transform.as_ref()))
        .collect();
    let mut out = Vec::with_capacity(collection.geometries.len());
    for (gi, g) in collection.geometries.iter().enumerate() {
        let mut used = BTreeSet::new();
        let mut ring_of = |indices: &serde_json::Value| -> Result<Vec<[f64; 2]>, ShapesError> {
            let mut ring: Vec<[f64; 2]> = Vec::new();
            for v in indices.as_array().map(Vec::as_slice).unwrap_or_default() {
                let i = v.as_i64().unwrap_or(i64::MAX);
                let (index, reversed) = if i < 0 { (!i, true) } else { (i, false) };
                let arc = usize::try_from(index)
                    .ok()
                    .and_then(|k| arcs.get(k).map(|a| (k, a)));
                let Some((k, arc)) = arc else {
                    return Err(ShapesError::BadArc {
                        geometry: gi,
                        arc: i,
                        arcs: arcs.len(),
                    });
                };
                used.insert(k);
                let points: Box<dyn Iterator<Item = &[f64; 2]>> = if reversed {
                    Box::new(arc.iter().rev())
                } else {
                    Box::new(arc.iter())
                };
                // Consecutive arcs share the joining point.
                let skip = usize::from(!ring.is_empty());
                ring.extend(points.skip(skip).copied());
            }
            Ok(ring)
        };
        let polygons = match g.kind.as_str() {
            "Polygon" => vec![rings(&g.arcs, &mut ring_of)?],
            "MultiPolygon" => {
                let mut ps = Vec::new();
                for p in g.arcs.as_array().map(Vec::as_slice).unwrap_or_default() {
                    ps.push(rings(p, &mut ring_of)?);
                }
                ps
            }
            _ => Vec::new(),
        };
        out.push(Geometry {
            id: g.id.as_ref().map(|v| match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            }),
            name: g
                .properties
                .as_ref()
                .and_then(|p| p.get("name"))
                .and_then(|n| n.as_str())
                .map(str::to_owned),
            polygons,
            arcs: used,
        });
    }
    Ok(out)
}

fn rings(
    value: &serde_json::Value,
    ring_of: &mut impl FnMut(&serde_json::Value) -> Result<Vec<[f64; 2]>, ShapesError>,
) -> Result<Vec<Vec<[f64; 2]>>, ShapesError> {
    let mut out = Vec::new();
    for r in value.as_array().map(Vec::as_slice).unwrap_or_default() {
        let ring = ring_of(r)?;
        if ring.len() >= 4 {
            out.push(ring);
        }
    }
    Ok(out)
}

/// An arc's points in longitude/latitude: undo the delta encoding and the quantization.
fn absolute(arc: &[[f64; 2]], t: Option<&Transform>) -> Vec<[f64; 2]> {
    let Some(t) = t else {
        return arc.to_vec();
    };
    let (mut x, mut y) = (0.0, 0.0);
    arc.iter()
        .map(|[dx, dy]| {
            x += dx;
            y += dy;
            [
                x * t.scale[0] + t.translate[0],
                y * t.scale[1] + t.translate[1],
            ]
        })
        .collect()
}

/// `key → alpha-2` from `iso3166.csv`.
pub fn iso_table(csv: &str) -> HashMap<String, String> {
    csv.lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.splitn(3, ',');
            Some((f.next()?.to_owned(), f.next()?.to_owned()))
        })
        .collect()
}

/// A point as a unit vector.
pub type Vec3 = [f64; 3];

/// Unit vector of a point given in degrees.
pub fn unit(lon_deg: f64, lat_deg: f64) -> Vec3 {
    let (lon, lat) = (lon_deg.to_radians(), lat_deg.to_radians());
    [lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()]
}

fn dot(a: &Vec3, b: &Vec3) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn cross(a: &Vec3, b: &Vec3) -> Vec3 {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

/// The angle between two unit vectors, radians (stable for small angles).
pub fn angle(a: &Vec3, b: &Vec3) -> f64 {
    let c = cross(a, b);
    dot(&c, &c).sqrt().atan2(dot(a, b))
}

/// Angular distance from `p` to the great-circle arc `a`–`b`, radians.
fn to_segment(p: &Vec3, a: &Vec3, b: &Vec3) -> f64 {
    let n = cross(a, b);
    let nn = dot(&n, &n);
    if nn > 1e-24 {
        // The foot of the perpendicular lies on the arc when it is on a's side of b and
        // b's side of a.
        if dot(&cross(a, p), &n) >= 0.0 && dot(&cross(p, b), &n) >= 0.0 {
            return (dot(p, &n) / nn.sqrt()).clamp(-1.0, 1.0).asin().abs();
        }
    }
    angle(p, a).min(angle(p, b))
}

/// A spherical cap holding a set of points: centre and angular radius (radians).
#[derive(Debug, Clone, Copy)]
struct Cap {
    centre: Vec3,
    radius: f64,
}

impl Cap {
    fn of(points: &[Vec3]) -> Cap {
        let mut c = [0.0; 3];
        for p in points {
            c[0] += p[0];
            c[1] += p[1];
            c[2] += p[2];
        }
        let norm = dot(&c, &c).sqrt();
        let centre = if norm > 1e-12 {
            [c[0] / norm, c[1] / norm, c[2] / norm]
        } else {
            points.first().copied().unwrap_or([1.0, 0.0, 0.0])
        };
        let radius = points.iter().map(|p| angle(&centre, p)).fold(0.0, f64::max);
        Cap { centre, radius }
    }

    /// No point of the cap is nearer to `p` than this.
    fn lower_bound(&self, p: &Vec3) -> f64 {
        (angle(&self.centre, p) - self.radius).max(0.0)
    }

    /// No point of this cap is nearer to a point of `other` than this.
    fn lower_bound_cap(&self, other: &Cap) -> f64 {
        (angle(&self.centre, &other.centre) - self.radius - other.radius).max(0.0)
    }
}

/// A run of boundary segments of one ring.
#[derive(Debug, Clone)]
struct Chunk {
    ring: usize,
    /// First point; the chunk's segments are `start..start + len` → `+1`.
    start: usize,
    len: usize,
    cap: Cap,
}

/// One polygon: rings in longitude/latitude and as unit vectors, with chunk caps.
#[derive(Debug, Clone)]
struct Polygon {
    rings: Vec<Vec<[f64; 2]>>,
    vectors: Vec<Vec<Vec3>>,
    bbox: [f64; 4],
    cap: Cap,
    chunks: Vec<Chunk>,
}

impl Polygon {
    fn new(rings: Vec<Vec<[f64; 2]>>) -> Polygon {
        let vectors: Vec<Vec<Vec3>> = rings
            .iter()
            .map(|r| r.iter().map(|[lon, lat]| unit(*lon, *lat)).collect())
            .collect();
        let mut bbox = [f64::MAX, f64::MAX, f64::MIN, f64::MIN];
        for [lon, lat] in rings.iter().flatten() {
            bbox = [
                bbox[0].min(*lon),
                bbox[1].min(*lat),
                bbox[2].max(*lon),
                bbox[3].max(*lat),
            ];
        }
        let all: Vec<Vec3> = vectors.iter().flatten().copied().collect();
        let cap = Cap::of(&all);
        let mut chunks = Vec::new();
        for (ri, ring) in vectors.iter().enumerate() {
            let segments = ring.len().saturating_sub(1);
            let mut start = 0;
            while start < segments {
                let len = CHUNK_SEGMENTS.min(segments - start);
                chunks.push(Chunk {
                    ring: ri,
                    start,
                    len,
                    cap: Cap::of(&ring[start..=start + len]),
                });
                start += len;
            }
        }
        Polygon {
            rings,
            vectors,
            bbox,
            cap,
            chunks,
        }
    }

    /// Even-odd rule over every ring (holes included), in longitude/latitude.
    fn contains(&self, lon: f64, lat: f64) -> bool {
        if lon < self.bbox[0] || lon > self.bbox[2] || lat < self.bbox[1] || lat > self.bbox[3] {
            return false;
        }
        let mut inside = false;
        for ring in &self.rings {
            for w in ring.windows(2) {
                let ([x1, y1], [x2, y2]) = (w[0], w[1]);
                if (y1 > lat) != (y2 > lat) && lon < (x2 - x1) * (lat - y1) / (y2 - y1) + x1 {
                    inside = !inside;
                }
            }
        }
        inside
    }

    fn segment_distance(&self, c: &Chunk, p: &Vec3) -> f64 {
        let ring = &self.vectors[c.ring];
        (c.start..c.start + c.len)
            .map(|i| to_segment(p, &ring[i], &ring[i + 1]))
            .fold(f64::MAX, f64::min)
    }
}

/// One country: every polygon of every geometry mapped to its alpha-2 code.
#[derive(Debug, Clone)]
pub struct Country {
    polygons: Vec<Polygon>,
    arcs: BTreeSet<usize>,
}

impl Country {
    /// Number of boundary points (for benchmarks and tests).
    pub fn points(&self) -> usize {
        self.polygons
            .iter()
            .flat_map(|p| &p.rings)
            .map(Vec::len)
            .sum()
    }

    /// Whether a point (degrees) lies inside one of the polygons.
    pub fn contains(&self, lon: f64, lat: f64) -> bool {
        self.polygons.iter().any(|p| p.contains(lon, lat))
    }

    /// Great-circle distance from a point (degrees) to the country, km: 0 inside, else to
    /// the nearest point of its boundary.
    pub fn distance_km(&self, lon: f64, lat: f64) -> f64 {
        if self.contains(lon, lat) {
            return 0.0;
        }
        let p = unit(lon, lat);
        let mut best = f64::MAX;
        let mut order: Vec<(f64, usize, usize)> = Vec::new();
        for (pi, poly) in self.polygons.iter().enumerate() {
            if poly.cap.lower_bound(&p) >= best {
                continue;
            }
            for (ci, c) in poly.chunks.iter().enumerate() {
                order.push((c.cap.lower_bound(&p), pi, ci));
            }
        }
        order.sort_by(|a, b| a.0.total_cmp(&b.0));
        for (bound, pi, ci) in order {
            if bound >= best {
                break;
            }
            let poly = &self.polygons[pi];
            best = best.min(poly.segment_distance(&poly.chunks[ci], &p));
        }
        best * EARTH_RADIUS_KM
    }

    /// Great-circle distance between two countries, km: 0 when they touch (share a border)
    /// or overlap, else between the nearest points of their boundaries.
    pub fn distance_to_km(&self, other: &Country) -> f64 {
        if self.arcs.intersection(&other.arcs).next().is_some() {
            return 0.0;
        }
        // One inside the other (an enclave whose border is not a shared arc).
        let first_point =
            |c: &Country| c.polygons.first().and_then(|p| p.rings[0].first()).copied();
        if let Some([lon, lat]) = first_point(other)
            && self.contains(lon, lat)
        {
            return 0.0;
        }
        if let Some([lon, lat]) = first_point(self)
            && other.contains(lon, lat)
        {
            return 0.0;
        }
        let mut pairs: Vec<(f64, &Polygon, &Chunk, &Polygon, &Chunk)> = Vec::new();
        for a in &self.polygons {
            for b in &other.polygons {
                for ca in &a.chunks {
                    if ca.cap.lower_bound_cap(&b.cap) > std::f64::consts::PI {
                        continue;
                    }
                    for cb in &b.chunks {
                        pairs.push((ca.cap.lower_bound_cap(&cb.cap), a, ca, b, cb));
                    }
                }
            }
        }
        pairs.sort_by(|x, y| x.0.total_cmp(&y.0));
        let mut best = f64::MAX;
        for (bound, a, ca, b, cb) in pairs {
            if bound >= best {
                break;
            }
            // The nearest points of two non-crossing segment runs include an end point of
            // one segment: every vertex of one run against the other's segments, both ways.
            let ra = &a.vectors[ca.ring];
            let rb = &b.vectors[cb.ring];
            for p in &ra[ca.start..=ca.start + ca.len] {
                best = best.min(b.segment_distance(cb, p));
            }
            for p in &rb[cb.start..=cb.start + cb.len] {
                best = best.min(a.segment_distance(ca, p));
            }
        }
        best * EARTH_RADIUS_KM
    }
}

/// Every country of a topology by ISO 3166-1 alpha-2 code.
#[derive(Debug, Clone, Default)]
pub struct Countries {
    by_code: HashMap<String, Country>,
}

impl Countries {
    /// Decode `object` of a TopoJSON document and key its geometries through `iso_csv`
    /// (geometries whose id the table lacks are left out).
    pub fn from_topojson(
        topojson: &str,
        object: &str,
        iso_csv: &str,
    ) -> Result<Countries, ShapesError> {
        let table = iso_table(iso_csv);
        let mut by_code: HashMap<String, Country> = HashMap::new();
        for g in decode(topojson, object)? {
            let key = match (&g.id, &g.name) {
                (Some(id), _) => id.clone(),
                (None, Some(name)) => format!("name:{name}"),
                (None, None) => continue,
            };
            let Some(code) = table.get(&key) else {
                continue;
            };
            let c = by_code.entry(code.clone()).or_insert_with(|| Country {
                polygons: Vec::new(),
                arcs: BTreeSet::new(),
            });
            c.polygons.extend(g.polygons.into_iter().map(Polygon::new));
            c.arcs.extend(g.arcs);
        }
        Ok(Countries { by_code })
    }

    /// The shipped 1:50 million geometry, decoded once per process.
    pub fn shipped() -> &'static Countries {
        static SHIPPED: OnceLock<Countries> = OnceLock::new();
        SHIPPED.get_or_init(|| {
            Countries::from_topojson(COUNTRIES_50M, "countries", ISO3166_CSV).unwrap_or_else(|e| {
                // The file is compiled in and checked by a test; never reached.
                tracing::error!(error = %e, "shipped country geometry does not decode");
                Countries::default()
            })
        })
    }

    /// One country (alpha-2, upper case).
    pub fn get(&self, code: &str) -> Option<&Country> {
        self.by_code.get(code)
    }

    /// How many countries there are.
    pub fn len(&self) -> usize {
        self.by_code.len()
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.by_code.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RABAT: (f64, f64) = (-6.8498, 34.0209);

    #[test]
    fn a_small_topology_decodes_with_its_transform_and_reversed_arcs() {
        // Two unit squares sharing the arc x = 1 (quantized by 0.5, translated by 10).
        let topo = r#"{"type":"Topology","transform":{"scale":[0.5,0.5],"translate":[10,20]},
            "objects":{"c":{"type":"GeometryCollection","geometries":[
              {"type":"Polygon","arcs":[[0,1]],"id":"1"},
              {"type":"MultiPolygon","arcs":[[[2,-1]]],"id":"2","properties":{"name":"B"}}]}},
            "arcs":[[[2,0],[0,2]],[[2,2],[-2,0],[0,-2],[2,0]],[[2,0],[2,0],[0,2],[-2,0]]]}"#;
        let g = decode(topo, "c").unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(
            g[0].polygons[0][0],
            vec![
                [11.0, 20.0],
                [11.0, 21.0],
                [10.0, 21.0],
                [10.0, 20.0],
                [11.0, 20.0]
            ]
        );
        assert_eq!(g[1].name.as_deref(), Some("B"));
        assert_eq!(
            g[1].polygons[0][0],
            vec![
                [11.0, 20.0],
                [12.0, 20.0],
                [12.0, 21.0],
                [11.0, 21.0],
                [11.0, 20.0]
            ]
        );
        assert!(g[0].arcs.contains(&0) && g[1].arcs.contains(&0));
        let bad = topo.replace("[[2,-1]]", "[[7]]");
        assert!(matches!(
            decode(&bad, "c"),
            Err(ShapesError::BadArc { arc: 7, .. })
        ));
        assert!(matches!(
            decode(topo, "nope"),
            Err(ShapesError::NoObject(_))
        ));
    }

    #[test]
    fn the_shipped_geometry_places_rabat_in_morocco_and_measures_to_the_nearest_border() {
        let c = Countries::shipped();
        assert!(c.len() > 200, "{} countries", c.len());
        let (lon, lat) = RABAT;
        let ma = c.get("MA").unwrap();
        assert!(ma.contains(lon, lat));
        assert_eq!(ma.distance_km(lon, lat), 0.0);
        // The nearest French soil from Rabat is the Basque coast, about 1,100 km away;
        // France's centroid is about 1,600 km away.
        let fr = c.get("FR").unwrap().distance_km(lon, lat);
        assert!((1000.0..1250.0).contains(&fr), "MA→FR {fr} km");
        let es = c.get("ES").unwrap().distance_km(lon, lat);
        assert!((150.0..300.0).contains(&es), "Rabat→ES {es} km");
        let us = c.get("US").unwrap().distance_km(lon, lat);
        assert!(us > 5000.0, "Rabat→US {us} km");
    }

    #[test]
    fn countries_that_share_a_border_are_zero_apart_and_others_are_measured() {
        let c = Countries::shipped();
        let (fr, es, ma, us) = (
            c.get("FR").unwrap(),
            c.get("ES").unwrap(),
            c.get("MA").unwrap(),
            c.get("US").unwrap(),
        );
        assert_eq!(fr.distance_to_km(es), 0.0);
        assert_eq!(ma.distance_to_km(ma), 0.0);
        // Across the Strait of Gibraltar (Spain's Ceuta and Melilla may touch Morocco).
        assert!(ma.distance_to_km(es) < 30.0);
        let ma_fr = ma.distance_to_km(fr);
        assert!((700.0..1250.0).contains(&ma_fr), "MA→FR {ma_fr} km");
        assert!(ma.distance_to_km(us) > 4000.0);
    }

    #[test]
    fn a_point_to_segment_distance_is_perpendicular_inside_the_segment_and_to_an_end_outside() {
        let a = unit(0.0, 0.0);
        let b = unit(10.0, 0.0);
        let over = to_segment(&unit(5.0, 1.0), &a, &b).to_degrees();
        assert!((over - 1.0).abs() < 1e-9, "{over}");
        let beyond = to_segment(&unit(13.0, 4.0), &a, &b).to_degrees();
        assert!((beyond - angle(&unit(13.0, 4.0), &b).to_degrees()).abs() < 1e-9);
    }
}
